"""`qlora estimate --measure`: a few real training steps of the recipe on random tokens on a CUDA
GPU, and the peak memory PyTorch saw. The step is step.py's: the model, loss kernel and optimizer
`qlora train` builds (train/run.py's build_model), the loss QloraTrainer computes."""

from __future__ import annotations

import torch

from qlora_cli.errors import ResourceError
from qlora_cli.estimate.step import build_step_parts, random_batch, train_step
from qlora_cli.recipe.schema import Recipe

GIB = 1024**3


def measure_peak(recipe: Recipe, steps: int = 3) -> dict:
    """Train `steps` micro-batches of random tokens and report the CUDA memory peak in GiB."""
    if not torch.cuda.is_available():
        raise ResourceError("--measure needs a CUDA GPU and none is visible here (torch.cuda.is_available() is False); drop --measure")
    parts = build_step_parts(recipe)
    generator = torch.Generator().manual_seed(recipe.train.seed)
    device = next(parts.model.parameters()).device
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        train_step(parts, random_batch(recipe, parts.vocab_size, generator))
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
