"""QLoRA on CUDA: the quickstart recipe trains with the NF4 base on the GPU, the compute dtype and
the attention and loss kernels `auto` picks there; its adapter loads with peft; the optimizer is
bitsandbytes' paged one and really pages; an fp16 run's grad scaler state survives --resume.
Skipped without a CUDA device (scripts/gpu_check.sh runs them on a lent GPU machine)."""

from __future__ import annotations

import json
import math
import re

import pytest

from tests.conftest import losses
from tests.gpu.conftest import attention_expected, loss_kernel_expected, train

pytestmark = pytest.mark.gpu

BNB_PAGED_MIN_NUMEL = 100_000  # bitsandbytes pages the states of tensors this large (Optimizer8bit.get_state_buffer)


def test_qlora_on_cuda_learns_and_saves_an_adapter_that_peft_loads(gpu_run):
    import torch
    from peft import PeftModel

    from qlora_cli.model import loading
    from qlora_cli.recipe.loader import load_recipe

    metrics = gpu_run.metrics
    assert metrics["device"].startswith("cuda")
    assert metrics["compute_dtype"] == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    assert metrics["quantization"] == "4-bit nf4"
    assert metrics["last_loss"] < 0.8 * metrics["first_loss"], metrics["log_history"][:3]
    assert 0 < metrics["peak_memory_gib"] < 4
    assert re.search(rf"attention\s+{attention_expected()}\b", gpu_run.stdout), gpu_run.stdout
    assert re.search(rf"loss_kernel\s+{loss_kernel_expected()}\b", gpu_run.stdout), gpu_run.stdout

    recipe = load_recipe(gpu_run.dir / "recipe.yaml")
    base = loading.load_base_model(recipe)
    assert any(type(module).__name__ == "Linear4bit" for module in base.modules())
    model = PeftModel.from_pretrained(base, str(gpu_run.dir)).eval()
    assert next(model.parameters()).is_cuda
    tokenizer = loading.load_tokenizer(recipe.model)
    ids = tokenizer("Which topic is this sentence about? The striker scored twice.", return_tensors="pt")["input_ids"].cuda()
    with torch.no_grad():
        tuned = model(input_ids=ids).logits.float()
        with model.disable_adapter():
            plain = model(input_ids=ids).logits.float()
    assert torch.isfinite(tuned).all()
    assert (tuned - plain).abs().max() > 1e-2  # the saved adapter is the trained one, not a zero update


def test_the_optimizer_is_paged_adamw_8bit_and_pages_large_states(gpu_model_dir, tmp_path):
    """What `train.optimizer: paged_adamw_8bit` gives the Trainer on CUDA, stepped once. bitsandbytes
    pages only the states of tensors of 100k elements or more: r=128 on down_proj makes lora_A that large."""
    import torch
    from transformers import Trainer

    from qlora_cli.model import kernels, loading
    from qlora_cli.recipe.loader import validate_recipe
    from qlora_cli.train.arguments import build_training_args
    from qlora_cli.train.run import build_model

    recipe = validate_recipe({
        "model": {"path": str(gpu_model_dir)},
        "lora": {"r": 128, "alpha": 128, "dropout": 0.0, "target_modules": ["down_proj"]},
        "data": {"train": "data/quickstart/train.jsonl", "format": "chat"},
        "train": {"optimizer": "paged_adamw_8bit"},
        "output": {"dir": str(tmp_path / "run")},
    })
    adapter, loss_kernel = build_model(recipe)
    model = adapter.model
    dtype = loading.compute_dtype(recipe)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(build_training_args(recipe, dtype, has_eval=False, model=model), model)
    params = [param for param in model.parameters() if param.requires_grad]
    optimizer = optimizer_cls(params, **optimizer_kwargs)
    assert getattr(optimizer, "is_paged", False), (optimizer_cls, optimizer_kwargs)

    ids = torch.randint(0, model.config.vocab_size, (1, 256), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.arange(256, device="cuda")[None]}
    with torch.autocast("cuda", dtype=dtype):
        loss = kernels.causal_lm_loss(model, batch, loss_kernel)
    loss.backward()
    optimizer.step()

    large = [param for param in params if param.numel() >= BNB_PAGED_MIN_NUMEL]
    assert large, "no trainable tensor is large enough to be paged"
    for param in large:
        state = optimizer.state[param]["state1"]
        assert getattr(state, "is_paged", False), f"state of a {tuple(param.shape)} tensor is not paged"
        assert state.dtype == torch.uint8  # 8-bit AdamW keeps its moments in one byte each
        assert torch.isfinite(param).all()


def test_fp16_run_trains_and_its_grad_scaler_state_resumes(gpu_model_dir, tmp_path):
    import torch

    out = tmp_path / "fp16"
    common = ["model.dtype=float16", "data.max_rows=64", "train.micro_batch_size=4", "train.logging_steps=1", "train.save_steps=4"]
    first = train(gpu_model_dir, out, *common, "train.max_steps=4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert json.loads((out / "metrics.json").read_text())["compute_dtype"] == "float16"
    assert (out / "checkpoint-4" / "scaler.pt").is_file(), sorted(p.name for p in (out / "checkpoint-4").iterdir())
    before = torch.load(out / "checkpoint-4" / "scaler.pt", weights_only=True)

    resumed = train(gpu_model_dir, out, "train.max_steps=8", resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr
    after = torch.load(out / "checkpoint-8" / "scaler.pt", weights_only=True)
    curve = losses(out)
    assert sorted(curve) == list(range(1, 9)) and all(math.isfinite(value) for value in curve.values()), curve
    if after["scale"] != before["scale"]:
        pytest.skip(f"inconclusive: the scale moved in steps 5-8 ({before['scale']} -> {after['scale']}), so a restart cannot be told apart")
    # No overflow in steps 5-8: a resumed scaler counts on from the checkpoint's tracker; a fresh one would restart at 0.
    assert after["_growth_tracker"] == before["_growth_tracker"] + 4, (before, after)
