"""The quickstart recipe as 2 processes (gloo backend) on the demo model on CPU, through
`qlora train --nproc 2`, which re-launches through torchrun: DDP with and without gradient
checkpointing, and FSDP-QLoRA (4-bit weights stored in the compute dtype, sharded)."""

import json

import pytest
import torch

from qlora_cli import rundir
from tests.conftest import DEMO_MODEL
from tests.integration.conftest import qlora

# Two ranks each: one test at a time, on one worker with the other multi-process tests.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("multiprocess")]

TWO_PROCESSES = [
    "--nproc", "2",
    "--set", "train.max_steps=3",
    "--set", "data.max_rows=24",
    "--set", "data.eval=null",
    "--set", "train.micro_batch_size=4",
    "--set", "train.logging_steps=1",
    "--set", "train.warmup_steps=0",
    "--set", "train.learning_rate=2e-3",
    "--set", "train.save_steps=3",
]


@pytest.mark.parametrize(
    "strategy, checkpointing",
    [("ddp", False), ("ddp", True), ("fsdp", False)],
    ids=["ddp", "ddp-gradient-checkpointing", "fsdp-qlora"],
)
def test_two_processes_train_one_run_directory(tmp_path, strategy, checkpointing):
    # Gradient checkpointing is the DDP pitfall: reentrant checkpointing fails there with
    # "Expected to mark a variable ready only once"; ours is non-reentrant.
    out = tmp_path / "run"
    result = qlora("train", "configs/quickstart.yaml", *TWO_PROCESSES, "--set", f"distributed.strategy={strategy}",
                   "--set", f"train.gradient_checkpointing={str(checkpointing).lower()}", "--set", f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"2 ({strategy})" in result.stdout and result.stdout.count("qlora train") == 1  # rank 0 alone reports
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # exactly one output directory
    # One lock for the job: rank 0 holds it (a second rank asking for it would have failed the run) and releases it.
    assert not (out / rundir.LOCK_NAME).exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["global_step"] == 3
    assert metrics["last_loss"] < metrics["first_loss"]
    # tokens of both ranks: 3 steps x 2 ranks x 4 rows, every row at least a few tokens
    assert metrics["tokens_seen"] > 3 * 2 * 4 * 10
    assert sorted(p.name for p in (out / "checkpoint-3").glob("rng_state_*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, out)(ids).logits
    assert (after - before).abs().max() > 1e-3

    if strategy == "fsdp":
        # FSDP gathered the whole adapter for rank 0: every LoRA matrix, none left empty.
        from safetensors import safe_open

        with safe_open(out / "adapter_model.safetensors", "pt") as weights:
            assert len(list(weights.keys())) == 30 * 7 * 2
    if checkpointing:
        # A 2-process checkpoint resumes only with 2 processes: one line, before loading anything.
        refused = qlora("train", out, "--resume")
        assert refused.returncode == 2 and "--nproc 2" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        # With 2 processes it continues from checkpoint-3 (each rank restores its own RNG state).
        resumed = qlora("train", out, "--resume", "--nproc", "2", "--set", "train.max_steps=4")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "checkpoint-3" in resumed.stderr  # "resuming from ...checkpoint-3"
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["global_step"] == 4 and [e["step"] for e in metrics["log_history"] if "loss" in e][-1] == 4
