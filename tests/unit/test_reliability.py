"""Nothing lost: a NaN loss, a full disk, an unwritable or damaged run directory each end in one
line and an exit code, with the last good checkpoint intact and `--resume` finishing the run."""

import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from transformers import TrainerCallback

from qlora_cli.errors import TrainingError
from qlora_cli.estimate.memory import Trainable
from qlora_cli.model import loading
from qlora_cli.recipe.loader import validate_recipe
from qlora_cli.train import storage
from qlora_cli.train.checkpointing import checkpoint_problem, checkpoints
from qlora_cli.train.run import run_training
from qlora_cli.train.trainer import QloraTrainer
from tests.conftest import TRAINING_PROGRESS, invoke, one_line_error, write_jsonl, write_recipe


def six_step_recipe(recipe_dict, tmp_path, **train):
    """recipe.yaml of a 6-step run saving every step (train settings overridable); returns (file, run dir)."""
    data = json.loads(json.dumps(recipe_dict))
    data["train"].update({"max_steps": 6, "save_steps": 1, "learning_rate": 5e-3, **train})
    return write_recipe(tmp_path, data), Path(data["output"]["dir"])


def train_cli(*args):
    return invoke("train", *args)


def steps(run_dir):
    return [int(path.name.split("-")[1]) for path in checkpoints(run_dir)]


def assert_no_leftovers(run_dir):
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith((".tmp", ".trash")) or p.name.endswith(".tmp")]


def assert_resumes_from(run_dir, step):
    result = train_cli(run_dir, "--resume")
    assert result.exit_code == 0, result.output
    assert f"resuming from {run_dir / f'checkpoint-{step}'}" in result.stderr
    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 6
    assert (run_dir / "adapter_model.safetensors").is_file()


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(recipe_dict, tmp_path, monkeypatch):
    recipe, run_dir = six_step_recipe(recipe_dict, tmp_path)
    compute_loss = QloraTrainer.compute_loss

    def nan_at_step_4(self, *args, **kwargs):
        loss = compute_loss(self, *args, **kwargs)
        return loss * float("nan") if self.state.global_step == 3 else loss

    monkeypatch.setattr(QloraTrainer, "compute_loss", nan_at_step_4)
    line = one_line_error(train_cli(recipe), 7, ignoring=TRAINING_PROGRESS)
    assert "loss became NaN/inf at step 4" in line and "checkpoint-3 is intact" in line
    assert "fp16" in line and "learning_rate" in line and "data row" in line
    assert steps(run_dir) == [2, 3] and all(checkpoint_problem(path) is None for path in checkpoints(run_dir))
    assert not (run_dir / "adapter_model.safetensors").exists(), "the NaN weights must not become the adapter"
    assert_no_leftovers(run_dir)

    monkeypatch.setattr(QloraTrainer, "compute_loss", compute_loss)
    assert_resumes_from(run_dir, 3)


class PoisonWeightsAt(TrainerCallback):
    """Make the adapter weights NaN after step `step` although that step's loss was finite."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if "lora_B" in n).fill_(float("nan"))


def test_non_finite_weights_are_never_checkpointed(recipe_dict, tmp_path):
    recipe = validate_recipe({**recipe_dict, "train": {**recipe_dict["train"], "max_steps": 6, "save_steps": 1}})
    with pytest.raises(TrainingError, match="the adapter weights became NaN/inf at step 3.*checkpoint-2 is intact"):
        run_training(recipe, show_progress=False, callbacks=(PoisonWeightsAt(3),))
    run_dir = Path(recipe.output.dir)
    assert steps(run_dir) == [1, 2] and not (run_dir / "adapter_model.safetensors").exists()


class SignalAt(TrainerCallback):
    def __init__(self, step, signum):
        self.step, self.signum = step, signum

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def test_sigterm_is_handled_like_ctrl_c(recipe_dict, tmp_path):
    recipe = validate_recipe({**recipe_dict, "train": {**recipe_dict["train"], "max_steps": 6, "save_steps": 100}})
    result = run_training(recipe, show_progress=False, callbacks=(SignalAt(3, signal.SIGTERM),))
    assert result.interrupted and result.metrics["global_step"] == 3
    assert steps(result.output_dir) == [3] and checkpoint_problem(checkpoints(result.output_dir)[0]) is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handler is removed after the run"


def test_resume_skips_a_damaged_checkpoint_and_refuses_when_none_is_intact(recipe_dict, tmp_path):
    recipe, run_dir = six_step_recipe(recipe_dict, tmp_path, max_steps=4)
    assert train_cli(recipe).exit_code == 0 and steps(run_dir) == [3, 4]
    optimizer = run_dir / "checkpoint-4" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # cut off as a crash mid-write would

    result = train_cli(run_dir, "--resume")
    assert result.exit_code == 0, result.output
    assert "skipping damaged checkpoint-4 (unreadable optimizer.pt)" in result.stderr
    assert f"resuming from {run_dir / 'checkpoint-3'}" in result.stderr
    assert steps(run_dir) == [3, 4] and checkpoint_problem(run_dir / "checkpoint-4") is None, "step 4 was trained and saved again"

    (run_dir / "checkpoint-3" / "trainer_state.json").unlink()
    (run_dir / "checkpoint-4" / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    line = one_line_error(train_cli(run_dir, "--resume"), 2, ignoring=TRAINING_PROGRESS)
    assert "no intact checkpoint" in line and "checkpoint-4 (unreadable adapter_model.safetensors)" in line
    assert "checkpoint-3 (missing trainer_state.json)" in line


def test_full_disk_while_saving_a_checkpoint_keeps_the_previous_one(recipe_dict, tmp_path, monkeypatch):
    recipe, run_dir = six_step_recipe(recipe_dict, tmp_path)
    real_save = torch.save

    def disk_full_at_step_3(obj, path, *args, **kwargs):
        if "checkpoint-3" in str(path) and str(path).endswith("optimizer.pt"):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", disk_full_at_step_3)
    line = one_line_error(train_cli(recipe), 5, ignoring=TRAINING_PROGRESS)
    assert "cannot write checkpoint-3" in line and "No space left on device" in line and "checkpoint-2 is intact" in line
    assert steps(run_dir) == [1, 2] and all(checkpoint_problem(path) is None for path in checkpoints(run_dir))
    assert not (run_dir / "adapter_model.safetensors").exists()
    assert_no_leftovers(run_dir)

    monkeypatch.setattr(torch, "save", real_save)
    assert_resumes_from(run_dir, 2)


def test_full_disk_while_writing_the_final_adapter(recipe_dict, tmp_path, monkeypatch):
    import peft.peft_model

    recipe, run_dir = six_step_recipe(recipe_dict, tmp_path)
    real_save_file = peft.peft_model.safe_save_file

    def disk_full_in_final_save(tensors, filename, *args, **kwargs):
        if ".tmp-saving-" in str(filename):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(filename))
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", disk_full_in_final_save)
    line = one_line_error(train_cli(recipe), 5, ignoring=TRAINING_PROGRESS)
    assert "cannot write the final adapter" in line and "checkpoint-6 is intact" in line
    assert not (run_dir / "adapter_model.safetensors").exists()
    assert_no_leftovers(run_dir)

    monkeypatch.setattr(peft.peft_model, "safe_save_file", real_save_file)
    assert_resumes_from(run_dir, 6)


def test_not_enough_free_space_is_refused_before_anything_is_written(recipe_dict, tmp_path, monkeypatch):
    recipe, run_dir = six_step_recipe(recipe_dict, tmp_path)
    usage = storage.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    line = one_line_error(train_cli(recipe), 5, ignoring=TRAINING_PROGRESS)
    assert "not enough disk space" in line and "0.00 GiB free" in line and "save_total_limit" in line
    assert not run_dir.exists()


def test_required_space_counts_kept_checkpoints_and_the_adapter(recipe_dict):
    recipe = validate_recipe({**recipe_dict, "train": {**recipe_dict["train"], "max_steps": 10, "save_steps": 5}, "output": {**recipe_dict["output"], "save_total_limit": 4}})
    adapter = [Trainable("lora", 10**6, 1, 4)]  # one fp32 tensor of a million parameters
    per_checkpoint = 10**6 * (4 + 8) + storage.OVERHEAD_BYTES  # fp32 adapter + two fp32 Adam moments
    assert storage.checkpoint_bytes(adapter, "adamw_torch") == per_checkpoint
    # two saves (steps 5 and 10), each beside the previous one while it is written, then the adapter
    assert storage.required_bytes(recipe, adapter) == 3 * per_checkpoint + 4 * 10**6 + storage.OVERHEAD_BYTES


def test_unwritable_output_dir_is_refused_before_training(recipe_dict, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("runs as root, which writes through chmod; test_output_dir_under_proc_or_a_file_is_refused_before_training covers the probe")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        recipe, _ = six_step_recipe({**recipe_dict, "output": {"dir": str(locked / "run")}}, tmp_path)
        line = one_line_error(train_cli(recipe), 5, ignoring=TRAINING_PROGRESS)
    finally:
        locked.chmod(0o755)
    assert f"cannot write in {locked}" in line and not (locked / "run").exists()


def test_output_dir_under_proc_or_a_file_is_refused_before_training(recipe_dict, tmp_path):
    """/proc refuses new files even to root, so the write probe is tested whoever runs it."""
    recipe, _ = six_step_recipe({**recipe_dict, "output": {"dir": "/proc/qlora-test/run"}}, tmp_path)
    assert "cannot write in /proc" in one_line_error(train_cli(recipe), 5, ignoring=TRAINING_PROGRESS)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    recipe, _ = six_step_recipe({**recipe_dict, "output": {"dir": str(blocker / "run")}}, tmp_path)
    assert "is a file, not a directory" in one_line_error(train_cli(recipe), 5, ignoring=TRAINING_PROGRESS)


def test_only_safetensors_weights_and_no_remote_code(recipe_dict, tmp_path, monkeypatch):
    import transformers

    calls = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        original = cls.from_pretrained.__func__

        def recording(klass, *args, _original=original, **kwargs):
            calls.append((klass.__name__, kwargs.get("trust_remote_code", False)))
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    recipe = validate_recipe({**recipe_dict, "train": {**recipe_dict["train"], "max_steps": 2, "save_steps": 1}})
    run_dir = run_training(recipe, show_progress=False).output_dir
    assert {name for name, _ in calls} == {"AutoTokenizer", "AutoModelForCausalLM"}
    assert not any(trusted for _, trusted in calls)

    pickles = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"})
    # The Trainer's resume state; everything else with weights is safetensors.
    assert pickles == [f"checkpoint-{s}/{n}" for s in (1, 2) for n in ("optimizer.pt", "rng_state.pth", "scheduler.pt")]
    from transformers.trainer_pt_utils import safe_globals

    with safe_globals():  # tensors, numpy arrays and plain containers: the Trainer reads them with weights_only=True
        for name in pickles:
            torch.load(run_dir / name, weights_only=True)
    assert (run_dir / "adapter_model.safetensors").is_file() and (run_dir / "checkpoint-2" / "adapter_model.safetensors").is_file()

    calls.clear()
    trusting = validate_recipe({**recipe_dict, "model": {**recipe_dict["model"], "trust_remote_code": True}})

    loading.load_tokenizer(trusting.model)
    loading.load_base_model(trusting)
    assert calls == [("AutoTokenizer", True), ("AutoModelForCausalLM", True)]


@pytest.fixture(scope="module")
def good_checkpoint(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("good")
    rows = [{"messages": [{"role": "user", "content": "what topic is cat ?"}, {"role": "assistant", "content": "music"}]}] * 4
    recipe = validate_recipe({
        "model": {"path": str(tiny_model_dir)},
        "quantization": {"bits": 16},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "data": {"train": str(write_jsonl(folder / "train.jsonl", rows)), "format": "chat"},
        "train": {"max_steps": 1, "micro_batch_size": 4, "save_steps": 1, "optimizer": "adamw_torch"},
        "output": {"dir": str(folder / "run")},
    })
    run_training(recipe, show_progress=False)
    return folder / "run" / "checkpoint-1"


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _nan_weights(path):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    first = next(iter(tensors))
    tensors[first] = torch.full_like(tensors[first], float("nan"))
    save_file(tensors, path)


@pytest.mark.parametrize("name, damage, problem", [
    ("trainer_state.json", Path.unlink, "missing trainer_state.json"),
    ("adapter_model.safetensors", Path.unlink, "missing adapter_model.safetensors"),
    ("optimizer.pt", Path.unlink, "missing optimizer.pt"),
    ("scheduler.pt", Path.unlink, "missing scheduler.pt"),
    ("rng_state.pth", Path.unlink, "missing rng_state.pth"),
    ("trainer_state.json", _truncate, "unreadable trainer_state.json"),
    ("adapter_model.safetensors", _truncate, "unreadable adapter_model.safetensors"),
    ("optimizer.pt", _truncate, "unreadable optimizer.pt"),
    ("rng_state.pth", _truncate, "unreadable rng_state.pth"),
    ("adapter_model.safetensors", _nan_weights, "non-finite values in adapter_model.safetensors"),
])
def test_every_kind_of_damage_is_detected(good_checkpoint, tmp_path, name, damage, problem):
    import shutil

    assert checkpoint_problem(good_checkpoint) is None
    copy = tmp_path / "checkpoint-1"
    shutil.copytree(good_checkpoint, copy)
    damage(copy / name)
    assert checkpoint_problem(copy).startswith(problem)
