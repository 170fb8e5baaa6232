"""DPO as separate processes on the tiny Llama: `qlora train` killed with SIGKILL after a checkpoint
resumes onto the reference run's curve, and `--nproc 2` (gloo DDP) trains one run directory."""

import json
import signal
import subprocess
import sys
import time

import pytest

from qlora_cli.train.run import run_training
from tests.conftest import ROOT, losses, recipe_from, write_recipe
from tests.unit.test_objectives import dpo_dict  # noqa: F401  (fixture)

# Several processes each: one test at a time, on one worker with the other multi-process tests.
pytestmark = pytest.mark.xdist_group("multiprocess")

STEPS = 8


def qlora_process(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qlora_cli", *map(str, args)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_dpo_run_killed_with_sigkill_resumes_onto_the_same_curve(dpo_dict, tmp_path):  # noqa: F811
    settings = {"save_steps": 2, "max_steps": STEPS}
    reference = run_training(recipe_from(dpo_dict, train=settings, output={"dir": str(tmp_path / "ref")}), show_progress=False)

    dpo_dict["train"].update(settings)
    dpo_dict["output"]["dir"] = str(tmp_path / "cut")
    recipe_file = write_recipe(tmp_path, dpo_dict)
    process = qlora_process("train", recipe_file)
    deadline = time.monotonic() + 300
    while not (tmp_path / "cut" / "checkpoint-4").is_dir():  # published by rename: whole once it is there
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "no checkpoint-4 in 300 s"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    assert not (tmp_path / "cut" / "adapter_model.safetensors").exists()

    resumed = subprocess.run([sys.executable, "-m", "qlora_cli", "train", recipe_file, "--resume"], cwd=ROOT,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoint-" in resumed.stderr  # "resuming from .../checkpoint-N"
    cut, ref = losses(tmp_path / "cut"), losses(reference.output_dir)
    assert sorted(cut) == list(range(1, STEPS + 1))
    assert all(cut[step] == pytest.approx(ref[step], rel=1e-3, abs=1e-5) for step in ref), (cut, ref)
    assert (tmp_path / "cut" / "adapter_model.safetensors").is_file()


def test_two_processes_train_one_dpo_run_on_gloo(dpo_dict, tmp_path):  # noqa: F811
    dpo_dict["train"].update(max_steps=3, micro_batch_size=2, save_steps=3)
    result = subprocess.run([sys.executable, "-m", "qlora_cli", "train", write_recipe(tmp_path, dpo_dict), "--nproc", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 (ddp)" in result.stdout and result.stdout.count("qlora train") == 1  # rank 0 alone reports
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["global_step"] == 3
    # both ranks' tokens: 3 steps x 2 ranks x 2 pairs x 2 sequences x 12 tokens
    assert metrics["tokens_seen"] == 3 * 2 * 2 * 2 * 12
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-3").glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert metrics["last_loss"] < metrics["first_loss"]
