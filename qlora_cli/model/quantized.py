"""4-bit layers, handled as bitsandbytes stores them: dequantized to the exact values it multiplies
with (`qlora merge --base dequantized`, fast CPU inference), and the CPU inference repacking undone
before training resumes.
"""

from __future__ import annotations

import os
from typing import Iterator

import torch


def is_4bit_linear(module) -> bool:
    return type(module).__name__ == "Linear4bit" and getattr(getattr(module, "weight", None), "quant_state", None) is not None


def dequantized_weights(model) -> Iterator[tuple[str, torch.nn.Module, torch.Tensor]]:
    """(module name, Linear4bit, dequantized weight) for each 4-bit layer, in the compute dtype."""
    from bitsandbytes.functional import dequantize_4bit

    # A CPU inference forward may have repacked weights (AVX512-BF16 kernels); undo it first.
    unpack_cpu_4bit_weights(model)
    for name, module in model.named_modules():
        if is_4bit_linear(module):
            weight = dequantize_4bit(module.weight.data, module.weight.quant_state)
            yield name, module, weight.reshape(module.out_features, module.in_features)


def replace_4bit_layers(model) -> int:
    """Swap every Linear4bit for an nn.Linear with its dequantized weight; returns how many."""
    replaced = [(name, module, weight) for name, module, weight in dequantized_weights(model)]
    for name, module, weight in replaced:
        linear = torch.nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        if module.bias is not None:
            linear.bias = torch.nn.Parameter(module.bias.data.to(weight.dtype), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return len(replaced)


def dequantized_bytes(model) -> int:
    total = 0
    for module in model.modules():
        if is_4bit_linear(module):
            total += module.in_features * module.out_features * torch.empty((), dtype=module.compute_dtype or torch.float32).element_size()
    return total


def available_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def speed_up_cpu_inference(model) -> bool:
    """On CPU, replace 4-bit layers by their dequantized values when they fit in half the free memory.

    The weights do not change: bitsandbytes' CPU forward multiplies by these same values
    (bit-identical logits with an fp32 compute dtype; see tests/unit/test_evaluate.py).
    """
    if torch.cuda.is_available() or not getattr(model, "is_loaded_in_4bit", False):
        return False
    if dequantized_bytes(model) > available_memory_bytes() / 2:
        return False
    return replace_4bit_layers(model) > 0


def unpack_cpu_4bit_weights(model) -> int:
    """Undo bitsandbytes' CPU inference repacking of 4-bit weights; returns how many were undone.

    On CPUs with AVX512-BF16, an eval-mode forward of a Linear4bit (Trainer evaluation,
    generate) repacks its weight for an inference kernel and never restores it; after that
    no gradient flows through the layer and training silently stalls. bitsandbytes itself
    undoes the packing only when saving (`_save_to_state_dict`); we do it before training.
    """
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    undone = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is not None and getattr(quant_state, "packing_format_for_cpu", False):
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
            module.quant_state = weight.quant_state
            undone += 1
    return undone
