"""Kill `qlora train` with SIGKILL and SIGTERM at random moments, many of them while a
checkpoint is being written, then `--resume`: every visible checkpoint is intact after every
kill, every resume starts from one, and the run finishes with each step logged exactly once.

The training processes are forked from one warm interpreter (multiprocessing's forkserver
with torch and transformers preloaded), so each of them starts in about a second.
"""

import json
import multiprocessing
import os
import random
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import yaml

from qlora_cli.rundir import STAGING_PREFIX
from qlora_cli.train.checkpointing import checkpoint_problem
from tests.conftest import write_jsonl

# Its kills land on training steps and checkpoint writes as they happen: under pytest-xdist no other
# test runs meanwhile, on any worker (`alone`, tests/conftest.py).
pytestmark = pytest.mark.alone

# Each of the three kills below lands within a few steps of its process's first logged step, so
# the run is still going at every kill: three kills always mean three resumes.
MAX_STEPS = 16
KILLS = 3


def run_cli(args: list[str], log_path: str) -> None:
    """Child process: `qlora ARGS` with stdout and stderr going to `log_path`."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    from qlora_cli.cli import app

    app(args=args, prog_name="qlora")


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["qlora_cli.cli", "qlora_cli.train.run", "tests.unit.test_kill_resume"])
    return context


def start(context, args, log):
    log.write_text("")
    process = context.Process(target=run_cli, args=([str(a) for a in args], str(log)), daemon=True)
    process.start()
    return process


def wait_for(condition, process, timeout=60.0):
    """Poll `condition` every 0.5 ms; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if not process.is_alive():
            return False
        time.sleep(0.0005)
    raise AssertionError("timed out waiting for the training process")


def last_logged_step(log: Path) -> int:
    steps = re.findall(r"step (\d+)/", log.read_text())
    return int(steps[-1]) if steps else 0


def staging(run_dir: Path) -> list[str]:
    try:
        return [name for name in os.listdir(run_dir) if name.startswith(STAGING_PREFIX + "checkpoint-")]
    except FileNotFoundError:
        return []


def assert_nothing_torn(run_dir: Path) -> list[int]:
    """Every checkpoint-N folder is complete and readable; so are the final files that exist."""
    found = sorted(int(p.name.split("-")[1]) for p in run_dir.glob("checkpoint-*"))
    for step in found:
        assert checkpoint_problem(run_dir / f"checkpoint-{step}") is None, f"checkpoint-{step}: {checkpoint_problem(run_dir / f'checkpoint-{step}')}"
    if (run_dir / "adapter_model.safetensors").exists():
        from safetensors.torch import load_file

        assert load_file(run_dir / "adapter_model.safetensors")
        json.loads((run_dir / "adapter_config.json").read_text())
    for name in ("metrics.json", "recipe.yaml"):
        if (run_dir / name).exists():
            yaml.safe_load((run_dir / name).read_text())
    return found


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_killed_training_always_resumes_from_an_intact_checkpoint(signum, forkserver, tiny_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"what topic is {w} ?"}, {"role": "assistant", "content": t}]}
            for w, t in [("cat", "music"), ("dog", "sports"), ("red", "weather"), ("blue", "cooking")] * 2]
    run_dir = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"path": str(tiny_model_dir)},
        "quantization": {"bits": 16},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "format": "chat", "max_seq_len": 64},
        "train": {"max_steps": MAX_STEPS, "micro_batch_size": 2, "logging_steps": 1, "save_steps": 1, "optimizer": "adamw_torch"},
        "output": {"dir": str(run_dir), "save_total_limit": 2},
    }))
    rng = random.Random(9 + signum)
    log = tmp_path / "log.txt"
    process = start(forkserver, ["train", recipe], log)
    kills = torn_by_kill = resumes = 0
    for trial in range(KILLS):
        # Signal once this process is training (its handler installed: a SIGTERM before that kills as
        # SIGKILL does) and a checkpoint exists (without one there is nothing to resume).
        assert wait_for(lambda: "step " in log.read_text() and any(run_dir.glob("checkpoint-*")), process), log.read_text()[-2000:]
        during_save = trial % 2 == 0
        if during_save:
            assert wait_for(lambda: staging(run_dir), process), log.read_text()[-2000:]
        else:
            # A random moment one to three steps on: counted in steps, not seconds, so a fast
            # machine cannot run to the end before the kill lands.
            target = last_logged_step(log) + rng.randint(1, 3)
            assert wait_for(lambda: last_logged_step(log) >= target, process), log.read_text()[-2000:]
            time.sleep(rng.uniform(0.0, 0.05))
        os.kill(process.pid, signum)
        process.join(60)
        kills += 1
        expected = -signal.SIGKILL if signum == signal.SIGKILL else 130
        assert process.exitcode == expected, (process.exitcode, log.read_text()[-2000:])
        torn_by_kill += bool(staging(run_dir))
        found = assert_nothing_torn(run_dir)
        assert found, "a checkpoint exists once training has logged a step"
        if signum == signal.SIGTERM:
            assert "checkpoint saved" in log.read_text()
        process = start(forkserver, ["train", run_dir, "--resume"], log)
        resumes += 1
        # It resumes from the newest checkpoint, which was just shown to be intact.
        assert wait_for(lambda: "resuming from" in log.read_text(), process) or "resuming from" in log.read_text(), log.read_text()[-2000:]
        assert f"resuming from {run_dir / f'checkpoint-{found[-1]}'}" in log.read_text()
        assert "skipping damaged" not in log.read_text()

    if process.is_alive() or process.exitcode is None:
        process.join(120)
    assert process.exitcode == 0, log.read_text()[-3000:]
    print(f"{signal.Signals(signum).name}: {kills} kills, {resumes} resumes, {torn_by_kill} left a half-written staging folder")
    assert kills == resumes == KILLS, (kills, resumes)
    if signum == signal.SIGKILL:
        assert torn_by_kill >= 1, "at least one kill must land while a checkpoint is being written"
    assert_nothing_torn(run_dir)
    assert not [name for name in os.listdir(run_dir) if name.startswith((".tmp", ".trash"))]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    logged_steps = [entry["step"] for entry in metrics["log_history"] if "loss" in entry]
    assert metrics["global_step"] == MAX_STEPS and logged_steps == list(range(1, MAX_STEPS + 1))
