"""loss.png of every run, `qlora report` over run directories, and the TensorBoard tracker: tiny
runs on the tiny Llama, read back the way a user would (the picture's curves, the table, the
event files)."""

import json
import shutil

import pytest
from typer.testing import CliRunner

from qlora_cli import plots
from qlora_cli.cli import app
from qlora_cli.recipe.loader import validate_recipe
from qlora_cli.report import differences, load_runs
from qlora_cli.train.run import run_training

runner = CliRunner()


def train(recipe_dict, **sections):
    data = json.loads(json.dumps(recipe_dict))
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return run_training(validate_recipe(data), show_progress=False).output_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Two tiny runs: one with periodic eval and TensorBoard, one without eval data."""
    from tests.conftest import write_jsonl

    folder = tmp_path_factory.mktemp("plots")
    rows = [
        {"messages": [{"role": "user", "content": f"what topic is {word} ?"}, {"role": "assistant", "content": topic}]}
        for word, topic in [("cat", "music"), ("dog", "sports"), ("red", "weather"), ("blue", "cooking")] * 4
    ]
    recipe = {
        "model": {"path": str(tiny_model_dir)},
        "quantization": {"bits": 16},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(write_jsonl(folder / "train.jsonl", rows)), "format": "chat", "max_seq_len": 64},
        "train": {"max_steps": 4, "micro_batch_size": 4, "logging_steps": 1, "save_steps": 100, "optimizer": "adamw_torch", "learning_rate": 1e-2},
    }
    with_eval = train(recipe, data={"eval_split": 0.25}, train={"eval_steps": 2, "report_to": ["tensorboard"]}, output={"dir": str(folder / "with-eval")})
    without_eval = train(recipe, output={"dir": str(folder / "without-eval")})
    return with_eval, without_eval


def history(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["log_history"]


def test_every_log_entry_counts_the_tokens_seen(runs):
    with_eval, _ = runs
    entries = [entry for entry in history(with_eval) if "loss" in entry or "eval_loss" in entry]
    tokens = [entry[plots.TOKENS_KEY] for entry in entries]
    assert all(isinstance(count, int) for count in tokens) and tokens == sorted(tokens) and tokens[0] > 0
    metrics = json.loads((with_eval / "metrics.json").read_text())
    assert tokens[-1] == metrics["tokens_seen"]


def test_loss_png_holds_train_and_eval_curves_against_steps_and_tokens(runs):
    with_eval, without_eval = runs
    for run_dir in runs:
        png = (run_dir / "loss.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and not (run_dir / "loss.png.tmp").exists()

    curves = plots.run_curves(history(with_eval))
    assert curves.train_loss.steps == (1, 2, 3, 4) and curves.eval_loss.steps[:2] == (2, 4)
    figure = plots.figure_of([curves])
    loss_steps, loss_tokens, lr_steps, lr_tokens = figure.axes
    labels = [line.get_label() for line in loss_steps.get_lines()]
    assert labels == ["train loss", "eval loss"]
    train_line = loss_tokens.get_lines()[0]
    assert list(train_line.get_xdata()) == list(curves.train_loss.tokens)
    assert list(train_line.get_ydata()) == pytest.approx(list(curves.train_loss.values))
    assert lr_tokens.get_xlabel() == "tokens seen (non-padding)" and lr_steps.get_xlabel() == "optimizer step"

    no_eval = plots.figure_of([plots.run_curves(history(without_eval))])
    assert [line.get_label() for line in no_eval.axes[0].get_lines()] == ["train loss"]


def test_pictures_of_empty_or_untokened_histories_still_draw(tmp_path):
    old_style = [{"loss": 2.0, "learning_rate": 1e-3, "step": 1}, {"loss": 1.0, "learning_rate": 5e-4, "step": 2}]
    for name, log_history in (("empty", []), ("old", old_style), ("nan", [{"loss": float("nan"), "step": 1}])):
        path = plots.draw([plots.run_curves(log_history, name)], tmp_path / f"{name}.png")
        assert path.read_bytes()[:4] == b"\x89PNG"
    texts = [text.get_text() for text in plots.figure_of([plots.run_curves(old_style)]).axes[1].texts]
    assert texts == ["tokens seen were not logged"]


def test_a_failure_to_draw_is_a_warning_not_a_lost_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "draw", broken)
    with pytest.warns(RuntimeWarning, match="could not draw .*loss.png: no fonts"):
        assert plots.write_loss_plot(tmp_path, {"log_history": []}) is None


def test_tensorboard_event_files_hold_the_logged_loss(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with_eval, without_eval = runs
    events = EventAccumulator(str(with_eval / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "eval/loss", "train/learning_rate"} <= set(scalars)
    logged = {entry["step"]: entry["loss"] for entry in history(with_eval) if "loss" in entry}
    read_back = {event.step: event.value for event in events.Scalars("train/loss")}
    assert read_back == pytest.approx(logged)
    assert not (without_eval / "tensorboard").exists() and not (with_eval / "runs").exists()


def test_report_of_one_run_prints_its_results_and_draws_it(runs, tmp_path):
    with_eval, _ = runs
    metrics = json.loads((with_eval / "metrics.json").read_text())
    result = runner.invoke(app, ["report", str(with_eval), "--output", str(tmp_path / "one.png")])
    assert result.exit_code == 0, result.output
    for text in ("final train loss", f"{metrics['last_loss']:.4g}", f"{metrics['eval_loss']:.4g}", "4/4", "peak memory", "wall time", "tokens/s"):
        assert text in result.output, text
    assert (tmp_path / "one.png").read_bytes()[:4] == b"\x89PNG"


def test_report_compares_runs_by_their_recipe_differences_and_eval_json(runs, tmp_path):
    with_eval, without_eval = runs
    evaluated = tmp_path / "evaluated"
    shutil.copytree(with_eval, evaluated)
    (evaluated / "eval.json").write_text(json.dumps({"models": {
        "base": {"loss": 3.5, "perplexity": 33.1, "exact_match": 0.0, "normalized_match": 0.25},
        "adapter": {"loss": 0.5, "perplexity": 1.65, "exact_match": 0.75, "normalized_match": 1.0},
    }}))
    assert differences(load_runs([with_eval, without_eval])) == {
        "data.eval_split": [0.25, 0.0], "train.eval_steps": [2, None], "train.report_to": [["tensorboard"], ["none"]],
    }
    result = runner.invoke(app, ["report", str(evaluated), str(without_eval), "--no-plot", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [run["label"] for run in report["runs"]] == ["evaluated", "without-eval"] and report["plot"] is None
    assert report["runs"][0]["evaluation"]["adapter"]["exact_match"] == 0.75 and report["runs"][1]["evaluation"] is None
    assert "output.dir" not in report["differences"] and "data.eval_split" in report["differences"]

    result = runner.invoke(app, ["report", str(evaluated), str(without_eval), "--output", str(tmp_path / "two.png")])
    assert result.exit_code == 0, result.output
    for text in ("data.eval_split", "train.report_to", "[tensorboard]", "[none]", "evaluate: exact match", "0.0% → 75.0%", "base → adapter"):
        assert text in result.output, text
    assert "lora.r" not in result.output
    curves = [plots.run_curves(history(run), run.name) for run in (evaluated, without_eval)]
    figure = plots.figure_of(curves)
    assert [line.get_label() for line in figure.axes[0].get_lines()] == ["evaluated train loss", "evaluated eval loss", "without-eval train loss"]


@pytest.mark.parametrize("make, expected", [
    (lambda path: path.mkdir(), "is not a run directory (no metrics.json)"),
    (lambda path: None, "does not exist"),
    (lambda path: path.write_text("x"), "is a file, not a run directory"),
    (lambda path: (path.mkdir(), (path / "metrics.json").write_text("{not json")), "cannot read metrics.json"),
])
def test_report_on_something_that_is_not_a_run_is_one_line(tmp_path, make, expected):
    target = tmp_path / "target"
    make(target)
    result = runner.invoke(app, ["report", str(target), "--output", str(tmp_path / "r.png")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], result.stderr
    assert not (tmp_path / "r.png").exists()
