"""`qlora estimate --measure`: a few real training steps of the recipe on random tokens on a CUDA
GPU, and the peak memory PyTorch saw: the model, loss kernel and optimizer `qlora train` would
build (train/run.py's build_model). The only part of the estimate package that imports torch."""

from __future__ import annotations

from qlora_cli.errors import ResourceError
from qlora_cli.model import kernels, loading
from qlora_cli.recipe.schema import Recipe
from qlora_cli.train.arguments import build_training_args
from qlora_cli.train.run import build_model

GIB = 1024**3


def _random_batch(recipe: Recipe, vocab_size: int, generator):
    """One worst-case micro-batch: every row filled to max_seq_len, laid out as the collators do."""
    import torch

    rows, seq = recipe.train.micro_batch_size, recipe.data.max_seq_len
    ids = torch.randint(0, vocab_size, (rows, seq), generator=generator)
    if recipe.data.packing:
        flat = ids.reshape(1, -1)
        positions = torch.arange(seq).repeat(rows).reshape(1, -1)
        return {"input_ids": flat, "labels": flat.clone(), "position_ids": positions}
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


def measure_peak(recipe: Recipe, steps: int = 3) -> dict:
    """Train `steps` micro-batches of random tokens and report the CUDA memory peak in GiB."""
    import torch

    if not torch.cuda.is_available():
        raise ResourceError("--measure needs a CUDA GPU and none is visible here (torch.cuda.is_available() is False); drop --measure")

    from transformers import Trainer

    # The model, loss kernel and optimizer `qlora train` builds for this recipe, not a look-alike.
    adapter, loss_kernel = build_model(recipe)
    dtype = loading.compute_dtype(recipe)
    model = adapter.model
    model.train()
    args = build_training_args(recipe, dtype, has_eval=False, model=model)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], **optimizer_kwargs)
    vocab_size = model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(recipe.train.seed)
    device = next(model.parameters()).device
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        batch = {k: v.to(device) for k, v in _random_batch(recipe, vocab_size, generator).items()}
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = kernels.causal_lm_loss(model, batch, loss_kernel)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    reserved_now = torch.cuda.memory_reserved()
    outside_pytorch = max(0, total - free - reserved_now)  # CUDA context, cuBLAS workspaces, other libraries
    peak_reserved = torch.cuda.max_memory_reserved()
    return {
        "device": torch.cuda.get_device_name(device),
        "steps": steps,
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 3),
        "peak_reserved_gib": round(peak_reserved / GIB, 3),
        "outside_pytorch_gib": round(outside_pytorch / GIB, 3),
        "peak_total_gib": round((peak_reserved + outside_pytorch) / GIB, 3),
    }
