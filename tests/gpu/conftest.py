"""What the CUDA tests train: the demo model, or, where its weights are absent (a lent GPU machine:
the 270 MB do not travel), the random-weight model of its shape and tokenizer that
scripts/gpu_check.sh builds and names in QLORA_GPU_MODEL (scripts/gpu_models.py). The quickstart
recipe's loss falls on either. One QLoRA run of the quickstart recipe on it is shared by the tests
that read an adapter (merge, GGUF, evaluate). Every test here is marked `gpu`: skipped without CUDA.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import DEMO_MODEL
from tests.integration.conftest import qlora

GPU_MODEL_ENV = "QLORA_GPU_MODEL"


def attention_expected() -> str:
    """The kernel `attn_implementation: auto` must pick on CUDA: flash-attention 2 when installed."""
    import importlib.util

    return "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"


def loss_kernel_expected() -> str:
    """The kernel `loss_kernel: auto` must pick on CUDA for a plain lm_head: Liger when installed."""
    import importlib.util

    return "liger" if importlib.util.find_spec("liger_kernel") else "chunked"


def train(model_dir: Path, out: Path, *overrides: str, resume: bool = False):
    """`qlora train configs/quickstart.yaml` on `model_dir` into `out` (or `qlora train out --resume`)."""
    sets = [item for override in overrides for item in ("--set", override)]
    if resume:
        return qlora("train", out, "--resume", *sets)
    return qlora("train", "configs/quickstart.yaml", "--set", f"model.path={model_dir}", "--set", f"output.dir={out}", *sets)


@dataclass(frozen=True)
class GpuRun:
    dir: Path
    stdout: str

    @property
    def metrics(self) -> dict:
        return json.loads((self.dir / "metrics.json").read_text())


@pytest.fixture(scope="session")
def gpu_model_dir() -> Path:
    named = os.environ.get(GPU_MODEL_ENV)
    if named:
        return Path(named)
    if DEMO_MODEL.is_dir():
        return DEMO_MODEL
    pytest.skip(f"no model to train: run `qlora demo-model`, or set {GPU_MODEL_ENV} to a model folder (scripts/gpu_models.py builds one)")


@pytest.fixture(scope="session")
def gpu_run(gpu_model_dir, tmp_path_factory) -> GpuRun:
    """The quickstart recipe as the demo trains it (40 steps, NF4, paged 8-bit AdamW, compute dtype
    auto), with gradient checkpointing on and a log line per step."""
    out = tmp_path_factory.mktemp("gpu") / "run"
    result = train(gpu_model_dir, out, "train.gradient_checkpointing=true", "train.logging_steps=1", "train.save_steps=20")
    assert result.returncode == 0, result.stderr[-3000:]
    return GpuRun(out, result.stdout)
