"""The demo run's loss.png and `qlora report` on it, with the eval.json of a short `qlora evaluate`
(on a copy, so the shared demo run stays as training left it)."""

import json
import shutil

import pytest

from qlora_cli import plots
from tests.integration.conftest import qlora

pytestmark = pytest.mark.integration


def test_demo_run_draws_loss_png_with_its_logged_steps(demo_run):
    png = demo_run / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    assert Image.open(png).size == (1100, 700)
    metrics = json.loads((demo_run / "metrics.json").read_text())
    curves = plots.run_curves(metrics["log_history"])
    assert curves.train_loss.steps == (1, 2, 3, 4)
    assert curves.eval_loss.steps == (4,) and curves.eval_loss.values == (pytest.approx(metrics["eval_loss"]),)
    assert curves.train_loss.tokens[-1] == metrics["tokens_seen"] > curves.train_loss.tokens[0] > 0


def test_report_on_the_demo_run_with_its_evaluation(demo_run, tmp_path):
    run = tmp_path / "quickstart"
    shutil.copytree(demo_run, run, ignore=shutil.ignore_patterns("checkpoint-*"))
    evaluated = qlora("evaluate", run, "--max-samples", "4", "--max-new-tokens", "4")
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    result = qlora("report", run, "--output", tmp_path / "report.png")
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((run / "metrics.json").read_text())
    scores = json.loads((run / "eval.json").read_text())["models"]
    for text in ("qlora report", "4/4", f"{metrics['last_loss']:.4g}", f"{metrics['eval_loss']:.4g}", "4-bit nf4",
                 f"{scores['base']['loss']:.4g} → {scores['adapter']['loss']:.4g}", "evaluate: base → adapter"):
        assert text in result.stdout, (text, result.stdout)
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
