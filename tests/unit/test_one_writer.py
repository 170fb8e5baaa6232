"""One writer per run directory (rundir.writer_lock): a second `qlora train`, `qlora merge` or
`qlora evaluate` on a folder another process is writing is refused in one line naming that
process, before it touches anything; a lock whose holder died (even by SIGKILL) is taken over;
and a resumed checkpoint that does not match its recipe, or a recipe that says one key twice,
is one line, never a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from qlora_cli import rundir
from qlora_cli.cli import app
from qlora_cli.errors import ConfigError, ResourceError
from qlora_cli.recipe.loader import load_recipe
from tests.unit.tiny_run import make_run

ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe))
    return path


def start(*args) -> subprocess.Popen:
    """The real command line in its own process, stderr read line by line."""
    return subprocess.Popen([sys.executable, "-m", "qlora_cli", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for_step(process: subprocess.Popen, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for line in process.stderr:
        if line.startswith(f"step {step}/"):
            return
        assert time.monotonic() < deadline, "the first run did not reach its step in time"
    raise AssertionError(f"the first run ended before step {step}: exit {process.wait()}")


def refusal(result: subprocess.CompletedProcess) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 5 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[0]


def long_recipe(recipe_dict, tmp_path, **train) -> Path:
    recipe = {**recipe_dict, "train": {**recipe_dict["train"], "max_steps": 100000, "save_steps": 1000, **train}}
    return write(tmp_path / "recipe.yaml", recipe)


def test_a_second_train_on_a_folder_being_written_is_refused_and_the_first_run_stays_intact(recipe_dict, tmp_path):
    recipe = long_recipe(recipe_dict, tmp_path)
    run_dir = Path(recipe_dict["output"]["dir"])
    first = start("train", recipe)
    try:
        wait_for_step(first, 2)
        snapshot = sorted(p.name for p in run_dir.iterdir())
        second = subprocess.run([sys.executable, "-m", "qlora_cli", "train", recipe, "--force", "--set", "lora.r=8"],
                                cwd=ROOT, capture_output=True, text=True)
        line = refusal(second)
        assert f"pid {first.pid}" in line and "qlora train" in line and str(run_dir) in line
        assert sorted(p.name for p in run_dir.iterdir()) == snapshot, "the refused run touched the folder"
        first.send_signal(signal.SIGTERM)  # the first run stops with a checkpoint
        assert first.wait(timeout=300) == 130
    finally:
        first.kill()
    assert not (run_dir / rundir.LOCK_NAME).exists(), "a finished run leaves no lock file"
    assert load_recipe(run_dir).lora.r == 4
    step = json.loads((run_dir / "metrics.json").read_text())["global_step"]
    resumed = subprocess.run([sys.executable, "-m", "qlora_cli", "train", run_dir, "--resume", "--set", f"train.max_steps={step + 1}"],
                             cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == step + 1


def test_the_lock_of_a_killed_holder_is_taken_over(recipe_dict, tmp_path):
    recipe = long_recipe(recipe_dict, tmp_path, save_steps=1)
    run_dir = Path(recipe_dict["output"]["dir"])
    first = start("train", recipe)
    try:
        wait_for_step(first, 2)
        assert (run_dir / rundir.LOCK_NAME).is_file()
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        first.kill()
    assert (run_dir / rundir.LOCK_NAME).is_file(), "SIGKILL leaves the lock file behind: the next run must take it over"
    resumed = subprocess.run([sys.executable, "-m", "qlora_cli", "train", run_dir, "--resume", "--set", "train.max_steps=4"],
                             cwd=ROOT, capture_output=True, text=True)
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr[-2000:]


def test_a_second_merge_on_one_output_is_refused(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, bits=16)
    output = tmp_path / "merged"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from qlora_cli import rundir\n"
         f"with rundir.writer_lock({str(output)!r}, 'this merge'):\n    print('held', flush=True); time.sleep(600)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([sys.executable, "-m", "qlora_cli", "merge", run, "--output", output, "--dtype", "fp32"],
                                cwd=ROOT, capture_output=True, text=True)
        line = refusal(second)
        assert f"pid {holder.pid}" in line and "this merge" in line
        assert sorted(p.name for p in output.iterdir()) == [rundir.LOCK_NAME], "the refused merge wrote into the folder"
    finally:
        holder.kill()
        holder.wait()
    # the holder died by SIGKILL: its lock is stale and the next merge takes it over
    merged = subprocess.run([sys.executable, "-m", "qlora_cli", "merge", run, "--output", output, "--dtype", "fp32"],
                            cwd=ROOT, capture_output=True, text=True)
    assert merged.returncode == 0, merged.stderr[-2000:]
    assert (output / "merge_report.json").is_file() and not (output / rundir.LOCK_NAME).exists()


def test_evaluate_refuses_a_run_directory_being_written(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir, bits=16)
    with rundir.writer_lock(run, "this run"):
        result = CliRunner().invoke(app, ["evaluate", str(run), "--max-samples", "2"])
    assert result.exit_code == 5 and f"pid {os.getpid()}" in result.output
    assert not (run / "eval.json").exists()


def test_the_lock_in_process(tmp_path):
    folder = tmp_path / "new"
    with rundir.writer_lock(folder, "this run"):
        assert (folder / rundir.LOCK_NAME).is_file() and rundir.entries(folder) == []
        rundir.check_unlocked(folder, "this run")  # our own lock is no obstacle
    assert not folder.exists(), "a folder made only to hold the lock is removed again"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ResourceError, match="is a file"):
        with rundir.writer_lock(tmp_path / "file", "this run"):
            pass


def test_resuming_a_checkpoint_of_another_rank_is_one_line(recipe_dict, tmp_path):
    recipe = write(tmp_path / "recipe.yaml", recipe_dict)
    runner = CliRunner()
    assert runner.invoke(app, ["train", str(recipe)]).exit_code == 0
    run_dir = Path(recipe_dict["output"]["dir"])
    # another writer's checkpoint under this run's recipe.yaml (what two unlocked writers left behind)
    checkpoint = sorted(run_dir.glob("checkpoint-*"))[-1]
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    from safetensors.torch import load_file, save_file

    weights = load_file(str(checkpoint / "adapter_model.safetensors"))
    doubled = {key: value.repeat(2, 1) if ".lora_A." in key else value.repeat(1, 2) if ".lora_B." in key else value for key, value in weights.items()}
    save_file(doubled, str(checkpoint / "adapter_model.safetensors"))
    (checkpoint / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    result = runner.invoke(app, ["train", str(run_dir), "--resume", "--set", "train.max_steps=3"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert checkpoint.name in lines[0] and "r 8 in the checkpoint, 4 in the recipe" in lines[0]


def test_a_checkpoint_whose_weights_disagree_with_its_config_is_damaged(recipe_dict, tmp_path):
    from qlora_cli.train.checkpointing import checkpoint_problem

    recipe = write(tmp_path / "recipe.yaml", recipe_dict)
    assert CliRunner().invoke(app, ["train", str(recipe)]).exit_code == 0
    checkpoint = sorted(Path(recipe_dict["output"]["dir"]).glob("checkpoint-*"))[-1]
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    (checkpoint / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    assert checkpoint_problem(checkpoint) == "adapter_model.safetensors holds rank-4 LoRA weights but adapter_config.json says r=8"


@pytest.mark.parametrize("text, key, lines", [
    ("model: {path: a}\nlora: {r: 8}\ndata: {train: t.jsonl, format: chat}\nlora: {r: 16}\noutput: {dir: o}\n", "lora", (2, 4)),
    ("model:\n  path: a\n  path: b\ndata: {train: t.jsonl, format: chat}\noutput: {dir: o}\n", "model.path", (2, 3)),
    ("model: {path: a}\ndata: {train: t.jsonl, format: chat}\ntrain:\n  lr_scheduler: cosine\n  seed: 1\n  seed: 2\noutput: {dir: o}\n", "train.seed", (5, 6)),
])
def test_a_key_given_twice_names_the_key_and_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_recipe(path)
    assert str(caught.value) == f"{path}: `{key}` is given twice (lines {lines[0]} and {lines[1]}); keep one of them"
