"""On CUDA the fused loss kernels (ours, chunked; Liger's Triton kernel) give the standard loss and
its gradients, on the NF4 model `qlora train` builds, under bf16 autocast, for a packed batch with
masked prompts. The CPU tests (tests/unit/test_kernels.py) cover `chunked` in fp32; Liger runs only here."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.gpu

ROW_LENGTHS = (300, 180, 36)
PROMPT_TOKENS = 20  # the first tokens of each row are a prompt: not scored


@pytest.fixture(scope="module")
def lora_model(gpu_model_dir, tmp_path_factory):
    """(peft model, compute dtype) with a random non-zero LoRA B, so every adapter weight gets a gradient."""
    import torch

    from qlora_cli.model import loading
    from qlora_cli.recipe.loader import validate_recipe
    from qlora_cli.train.run import build_model

    recipe = validate_recipe({
        "model": {"path": str(gpu_model_dir)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": "data/quickstart/train.jsonl", "format": "chat"},
        "train": {"loss_kernel": "standard"},
        "output": {"dir": str(tmp_path_factory.mktemp("kernels"))},
    })
    adapter, _ = build_model(recipe)
    model = adapter.model
    generator = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.copy_(0.02 * torch.randn(param.shape, generator=generator))
    return model, loading.compute_dtype(recipe)


def packed_batch(vocab_size: int) -> dict:
    import torch

    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab_size, (sum(ROW_LENGTHS),), generator=generator)
    labels = ids.clone()
    start = 0
    for length in ROW_LENGTHS:
        labels[start:start + PROMPT_TOKENS] = -100
        start += length
    positions = torch.cat([torch.arange(length) for length in ROW_LENGTHS])
    return {"input_ids": ids[None].cuda(), "labels": labels[None].cuda(), "position_ids": positions[None].cuda()}


def loss_and_gradient(model, batch: dict, kernel: str, dtype) -> tuple:
    """(loss, every adapter gradient as one flat fp32 vector) of one forward and backward."""
    import torch

    from qlora_cli.model import kernels

    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=dtype):
        loss = kernels.causal_lm_loss(model, batch, kernels.LossKernel(kernel, "test"))
    loss.backward()
    gradient = torch.cat([param.grad.float().flatten() for param in model.parameters() if param.requires_grad])
    return float(loss), gradient


@pytest.mark.parametrize("kernel", ["chunked", "liger"])
def test_fused_loss_kernel_matches_the_standard_loss_and_gradients(lora_model, kernel):
    import torch

    if kernel == "liger":
        pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    model, dtype = lora_model
    batch = packed_batch(model.config.vocab_size)
    expected_loss, expected = loss_and_gradient(model, batch, "standard", dtype)
    loss, gradient = loss_and_gradient(model, batch, kernel, dtype)
    assert expected.norm() > 0 and torch.isfinite(gradient).all()
    assert loss == pytest.approx(expected_loss, rel=2e-3)
    # bf16 activations through 30 layers: agreement to a few bf16 roundings, not to fp32's.
    assert float((gradient - expected).norm() / expected.norm()) < 5e-2
    assert float(torch.nn.functional.cosine_similarity(gradient, expected, dim=0)) > 0.998
