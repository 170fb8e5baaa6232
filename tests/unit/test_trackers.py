"""`train.report_to`: a tracker that is not installed is a one-line error before anything is
loaded or written; wandb runs offline into the run directory unless the user says otherwise.
(TensorBoard's event files are read back in test_plots_report.py.)"""

import os
import sys

import pytest
import yaml
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.errors import ConfigError
from qlora_cli.train import trackers


@pytest.fixture
def fresh_environment(monkeypatch):
    for name in ("WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(trackers, "_set_by_us", {})
    return monkeypatch


def test_asking_for_wandb_without_it_installed_is_one_line_before_loading(tmp_path, recipe_dict, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed, whether or not it is
    recipe_dict["train"]["report_to"] = ["wandb"]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    result = CliRunner().invoke(app, ["train", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: train.report_to: wandb is not installed; pip install wandb, or remove it from report_to"]
    assert not (tmp_path / "run").exists()


def test_wandb_runs_offline_into_the_run_directory_unless_the_user_chose(tmp_path, fresh_environment):
    fresh_environment.setattr(trackers, "_installed", lambda module: True)
    trackers.prepare(["wandb"], tmp_path / "first")
    assert os.environ["WANDB_MODE"] == "offline" and os.environ["WANDB_DIR"] == str((tmp_path / "first").resolve())
    trackers.prepare(["wandb"], tmp_path / "second")  # a second run in the same process moves what we set
    assert os.environ["WANDB_DIR"] == str((tmp_path / "second").resolve())

    fresh_environment.setattr(trackers, "_set_by_us", {})
    fresh_environment.setenv("WANDB_MODE", "online")
    fresh_environment.setenv("WANDB_DIR", "/somewhere/else")
    trackers.prepare(["wandb"], tmp_path / "third")
    assert os.environ["WANDB_MODE"] == "online" and os.environ["WANDB_DIR"] == "/somewhere/else"


def test_tensorboard_missing_is_a_config_error(monkeypatch, tmp_path):
    monkeypatch.setattr(trackers, "_installed", lambda module: False)
    with pytest.raises(ConfigError, match="tensorboard is not installed"):
        trackers.prepare(["tensorboard"], tmp_path)
    trackers.prepare(["none"], tmp_path)  # nothing asked, nothing checked


@pytest.mark.skipif(not trackers._installed("wandb"), reason="wandb is optional (pip install wandb)")
def test_wandb_offline_run_is_written_into_the_run_directory(recipe_dict, fresh_environment):
    from qlora_cli.recipe.loader import validate_recipe
    from qlora_cli.train.run import run_training

    recipe_dict["train"]["report_to"] = ["wandb"]
    fresh_environment.setenv("WANDB_SILENT", "true")
    result = run_training(validate_recipe(recipe_dict), show_progress=False)
    runs = list((result.output_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
