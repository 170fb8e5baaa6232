"""What a hostile new user found: silent wrong results and crashes, each kept here as the command
(or call) that showed it and what the user should have seen instead. On the tiny Llama of
tests/conftest.py (and a tiny Gemma 2); the GGUF findings are in test_hostile_user_gguf.py."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_cli import plots
from qlora_cli.errors import ModelError
from qlora_cli.train import storage
from qlora_cli.train.callbacks import StopOnSignal
from qlora_cli.train.run import run_training
from qlora_cli.train.trainer import QloraTrainer
from tests.conftest import ROOT, TRAINING_PROGRESS, invoke, one_line_error, recipe_from, write_recipe
from tests.unit.tiny_run import make_run

HINT = "Continue with: "


@pytest.fixture
def stop_after_first_step(monkeypatch):
    """Every run of this test stops after its first step as a Ctrl-C / SIGTERM stops it (checkpoint saved, exit 130)."""
    original = StopOnSignal.on_step_end

    def requested(self, args, state, control, **kwargs):
        self.requested = True
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(StopOnSignal, "on_step_end", requested)
    return monkeypatch


def resume_hint(result) -> list[str]:
    """The command `qlora train` printed to continue a stopped run, as argv."""
    assert result.exit_code == 130, result.output
    line = next(line for line in result.stderr.splitlines() if HINT in line)
    return shlex.split(line.split(HINT, 1)[1])


# ---- 1. the resume hint continues the run it was printed for ------------------------------------


def test_the_resume_hint_names_the_run_directory_and_continues_that_run(recipe_dict, tmp_path, stop_after_first_step):
    run_a, run_b = tmp_path / "runs" / "A", tmp_path / "runs" / "B"
    recipe = write_recipe(tmp_path, {**recipe_dict, "output": {"dir": str(run_a)}})
    invoke("train", recipe)  # run A, as the recipe says
    hint = resume_hint(invoke("train", recipe, "--set", f"output.dir={run_b}"))  # run B, from the same recipe
    assert hint == ["qlora", "train", str(run_b), "--resume"]

    stop_after_first_step.undo()
    resumed = invoke(*hint[1:])
    assert resumed.exit_code == 0, resumed.output
    assert f"resuming from {run_b / 'checkpoint-1'}" in resumed.stderr
    assert (run_b / "adapter_model.safetensors").is_file()
    assert not (run_a / "adapter_model.safetensors").exists() and not (run_a / "checkpoint-2").exists()  # A untouched


# ---- 3. the final evaluation runs once --------------------------------------------------------


@pytest.mark.parametrize("eval_steps, evaluated_at", [(2, [2, 4]), (3, [3, 4]), (None, [4])])
def test_a_run_evaluates_once_at_the_end(recipe_dict, monkeypatch, eval_steps, evaluated_at):
    calls = []
    original = QloraTrainer.evaluate

    def counted(self, *args, **kwargs):
        calls.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(QloraTrainer, "evaluate", counted)
    recipe = recipe_from(recipe_dict, data={"eval_split": 0.25}, train={"max_steps": 4, "eval_steps": eval_steps, "save_steps": 100})
    result = run_training(recipe, show_progress=False)
    assert calls == evaluated_at
    history = json.loads((result.output_dir / "metrics.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "eval_loss" in entry] == evaluated_at


# ---- 4. tracebacks that are one line now ------------------------------------------------------


def test_a_truncated_model_file_is_one_line_in_validate_and_train(recipe_dict, tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    with open(weights, "r+b") as handle:  # a download cut short
        handle.truncate(weights.stat().st_size // 2)
    recipe = write_recipe(tmp_path, {**recipe_dict, "model": {"path": str(model)}})
    for command in ("validate", "train"):
        line = one_line_error(invoke(command, recipe), 4, ignoring=TRAINING_PROGRESS)
        assert "model.safetensors is truncated" in line and "download or copy the model again" in line
    assert not Path(recipe_dict["output"]["dir"]).exists()


def test_merge_output_under_a_file_is_one_line(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    line = one_line_error(invoke("merge", run, "--output", blocker / "merged"), 5)
    assert f"{blocker} is a file, not a directory" in line and "choose another --output" in line


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_an_empty_data_file_is_one_line(recipe_dict, tmp_path, content):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    recipe = write_recipe(tmp_path, {**recipe_dict, "data": {**recipe_dict["data"], "train": str(empty)}})
    line = one_line_error(invoke("validate", recipe), 3)
    assert f"data.train: {empty} is empty (no rows)" in line


# ---- 5. SIGTERM during merge is Ctrl-C; leftovers of killed merges go --------------------------

SIGTERM_IN_MERGE = """
import os, signal, sys
from qlora_cli.merge import fold
folded = fold.merged_model
def terminated(*args, **kwargs):  # a SIGTERM while the merge writes into its staging folder
    os.kill(os.getpid(), signal.SIGTERM)
    return folded(*args, **kwargs)
fold.merged_model = terminated
from qlora_cli.cli import app
app(args=sys.argv[1:], prog_name="qlora")
"""


def test_sigterm_during_merge_exits_130_and_removes_its_staging_folder(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir)
    output = tmp_path / "merged"
    environment = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", SIGTERM_IN_MERGE, "merge", str(run), "--output", str(output), "--no-verify"],
                          capture_output=True, text=True, timeout=600, env=environment, cwd=ROOT, check=False)
    assert done.returncode == 130, (done.returncode, done.stderr[-2000:])
    assert "interrupted" in done.stderr and "Traceback" not in done.stderr
    assert not output.exists() and list(tmp_path.glob(".merged.*")) == []


def test_a_merge_removes_what_killed_merges_to_the_same_output_left(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir)
    killed = [tmp_path / ".merged.merging-k1ll3d00", tmp_path / ".merged.replaced-k1ll3d01"]
    others = [tmp_path / ".other.merging-l1v3ab00", tmp_path / ".merged.merging-x.merging-l1v3ab01"]  # other outputs' stagings
    for folder in killed + others:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 1024)
    result = invoke("merge", run, "--output", tmp_path / "merged", "--no-verify")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert [folder for folder in killed if folder.exists()] == [] and all(folder.is_dir() for folder in others)


# ---- 6. messages that mislead -----------------------------------------------------------------


def test_a_bad_set_value_is_blamed_on_the_set_not_on_a_line_of_the_recipe(recipe_dict, tmp_path):
    recipe = write_recipe(tmp_path, recipe_dict)
    line = one_line_error(invoke("validate", recipe, "--set", "train.max_steps=abc"), 2)
    assert line.startswith("error: --set train.max_steps=abc: `train.max_steps`") and " line " not in line
    line = one_line_error(invoke("validate", recipe, "--set", "train.max_step=5"), 2)
    assert "--set train.max_step=5: unknown key `train.max_step`; did you mean `train.max_steps`?" in line
    bad_file = write_recipe(tmp_path, {**recipe_dict, "train": {**recipe_dict["train"], "max_steps": "abc"}}, "bad.yaml")
    assert f"{bad_file} line " in one_line_error(invoke("validate", bad_file), 2)  # a bad value in the file still names its line


def test_merge_to_an_unwritable_place_says_not_writable(tiny_model_dir, tmp_path):
    run = make_run(tmp_path / "run", tiny_model_dir)
    line = one_line_error(invoke("merge", run, "--output", "/proc/qlora-merge-test"), 5)
    assert "cannot write in /proc (not writable" in line and "free" not in line


def test_a_malformed_jsonl_line_is_named_by_file_and_line(recipe_dict, tmp_path):
    rows = tmp_path / "rows.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "what topic is cat ?"}, {"role": "assistant", "content": "music"}]})
    rows.write_text(f"{good}\n{good}\n{{\"messages\": [oops]}}\n{good}\n")
    recipe = write_recipe(tmp_path, {**recipe_dict, "data": {**recipe_dict["data"], "train": str(rows)}})
    line = one_line_error(invoke("validate", recipe), 3)
    assert f"data.train: {rows} line 3: not valid JSON" in line and "fix or remove that line" in line
    rows.write_text(f"{good}\n[1, 2]\n")
    assert f"{rows} line 2: a row must be a JSON object, not list" in one_line_error(invoke("validate", recipe), 3)


def test_the_disk_check_sizes_a_checkpoint_by_what_it_holds(recipe_dict, monkeypatch):
    asked = {}
    check = storage.check_free_space

    def recorded(recipe, tensors, reclaimable=False, **kwargs):
        asked.update(tensors=tensors, optimizer=recipe.train.optimizer, **kwargs)
        return check(recipe, tensors, reclaimable, **kwargs)

    monkeypatch.setattr(storage, "check_free_space", recorded)
    result = run_training(recipe_from(recipe_dict, train={"max_steps": 2, "save_steps": 1}), show_progress=False)
    written = max(sum(file.stat().st_size for file in folder.rglob("*") if file.is_file()) for folder in result.output_dir.glob("checkpoint-*"))
    small_files = storage.OVERHEAD_BYTES + asked.get("tokenizer_bytes", 0)
    expected = storage.checkpoint_bytes(asked["tensors"], asked["optimizer"], small_files)
    assert written <= expected <= written + 2**20, (written, expected)  # was written + 64 MiB: 0.25 GiB for a 3.9 MB checkpoint


def interrupted_run(recipe_dict, tmp_path) -> Path:
    """A run stopped (as by Ctrl-C) after its first step: checkpoint-1, no final adapter."""
    recipe = write_recipe(tmp_path, recipe_dict)
    assert invoke("train", recipe).exit_code == 130
    run = Path(recipe_dict["output"]["dir"])
    assert (run / "checkpoint-1").is_dir() and not (run / "adapter_model.safetensors").exists()
    return run


def test_merge_and_evaluate_on_a_stopped_run_say_it_can_be_resumed(recipe_dict, tmp_path, stop_after_first_step):
    run = interrupted_run(recipe_dict, tmp_path)
    for command in (["merge", run, "--output", tmp_path / "merged"], ["evaluate", run]):
        line = one_line_error(invoke(*command), 4)
        assert "its run stopped at step 1" in line and f"`qlora train {run} --resume`" in line, line


@pytest.fixture(scope="module")
def tiny_gemma2_dir(tmp_path_factory):
    """A 2-layer random Gemma 2 (which transformers runs with eager attention only) with the tiny tokenizer."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from tests.conftest import build_tiny_tokenizer

    folder = tmp_path_factory.mktemp("tiny-gemma2")
    tokenizer = build_tiny_tokenizer()
    config = Gemma2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    Gemma2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_gemma2s_attention_refusal_is_whole_and_names_the_fix(recipe_dict, tmp_path, tiny_gemma2_dir):
    from qlora_cli.evaluate import inference

    fix = "add --set model.attn_implementation=eager"
    recipe = write_recipe(tmp_path, {**recipe_dict, "model": {"path": str(tiny_gemma2_dir), "attn_implementation": "sdpa"}})
    line = one_line_error(invoke("train", recipe), 4, ignoring=TRAINING_PROGRESS)
    assert "Gemma2ForCausalLM does not support" in line and line.endswith(fix), line
    with pytest.raises(ModelError) as refused:  # the merged model of `qlora evaluate --merged` / merge's check
        inference.load_merged_model(tiny_gemma2_dir, recipe_from(recipe_dict, model={"path": str(tiny_gemma2_dir), "attn_implementation": "sdpa"}))
    assert str(refused.value).endswith(fix) and "Example:" not in str(refused.value)
    assert invoke("validate", recipe, "--set", "model.attn_implementation=eager").exit_code == 0  # the fix is a valid --set


# ---- 7. the report picture --------------------------------------------------------------------


def series(points: int, start: float, slope: float) -> plots.Series:
    steps = tuple(range(1, points + 1))
    return plots.Series(steps, tuple(100 * step for step in steps), tuple(start + slope * step for step in steps))


def test_five_runs_legend_stays_off_the_curves_and_one_point_runs_show_their_learning_rate():
    runs = [
        plots.RunCurves(f"run-{index}", series(10, 3.0 + index / 10, -0.2), series(5, 3.2, -0.3), series(10, 1e-4, -5e-6))
        for index in range(4)
    ]
    runs.append(plots.RunCurves("one-step", series(1, 3.1, 0.0), series(0, 0.0, 0.0), series(1, 2e-4, 0.0)))
    figure = plots.figure_of(runs)
    figure.canvas.draw()
    legends = figure.legends + [axis.get_legend() for axis in figure.axes if axis.get_legend() is not None]
    assert len(legends) == 1
    box = legends[0].get_window_extent()
    assert not any(box.overlaps(axis.get_window_extent()) for axis in figure.axes)
    assert len(legends[0].get_texts()) == 9  # train and eval loss of four runs, train loss of the fifth
    _, _, lr_steps, lr_tokens = figure.axes
    for axis in (lr_steps, lr_tokens):
        one_point = next(line for line in axis.get_lines() if line.get_label().startswith("one-step"))
        assert len(one_point.get_xdata()) == 1 and one_point.get_marker() not in (None, "None", "", " ") and one_point.get_markersize() > 0
