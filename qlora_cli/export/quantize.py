"""The GGUF types llama.cpp's own quantizer makes (q4_0 and the k-quants q4_k_m, q5_k_m, q6_k):
our f16 file is written first, then llama.cpp quantizes it, as `llama-quantize` would, optionally
guided by an importance matrix measured on the run's training rows (`--imatrix`).

The importance matrix is what llama.cpp's `llama-imatrix` computes: for every weight matrix, the
mean over tokens of each input column's squared activation (the columns whose inputs are large get
the finer rounding), measured here with forward hooks on the merged model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from qlora_cli.export import gguf_arch, gguf_writer, llamacpp

# Default rows of training data that the importance matrix is measured on (llama-imatrix's
# usual run is ~100 chunks of 512 tokens; a fine-tune's own rows are the closest to its use).
IMATRIX_ROWS = 128


def weight_names(model) -> dict[str, str]:
    """HF Linear module name -> llama.cpp tensor name of its weight (those quantized)."""
    import gguf

    config = model.config.get_text_config()
    arch = gguf_arch.check_architecture(model.config)
    names = gguf.get_tensor_name_map(next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch), config.num_hidden_layers)
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            mapped = names.get_name(name + ".weight", try_suffixes=(".weight",))
            if mapped is not None:
                found[name] = mapped
    return found


@torch.no_grad()
def importance_matrix(model, rows: list[list[int]]) -> dict[str, np.ndarray]:
    """{llama.cpp tensor name: mean squared input activation per column} over the tokens of `rows`."""
    names = weight_names(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def record(module, inputs, output):
            values = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])
            sums[name] = sums.get(name, 0) + values.square().sum(dim=0)
            counts[name] = counts.get(name, 0) + values.shape[0]
        return record

    handles = [model.get_submodule(name).register_forward_hook(hook(name)) for name in names]
    try:
        device = next(model.parameters()).device
        for row in rows:
            model(input_ids=torch.tensor([row], device=device))
    finally:
        for handle in handles:
            handle.remove()
    return {names[name]: (sums[name] / counts[name]).cpu().numpy() for name in sums}


def tensor_types(path: Path) -> dict[str, int]:
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
    return counts


def write_quantized(model, tokenizer, path: Path, gguf_type: str, name: str, imatrix_rows: Optional[list[list[int]]] = None) -> dict:
    """Write `model` as a `gguf_type` GGUF at `path` through llama.cpp's quantizer; the summary of
    write_gguf with the final file's size and tensor types."""
    source = path.with_name(path.stem + ".f16-source.gguf")
    try:
        summary = gguf_writer.write_gguf(model, tokenizer, source, "f16", name)
        imatrix = importance_matrix(model, imatrix_rows) if imatrix_rows else None
        llamacpp.quantize(source, path, gguf_type, imatrix)
    finally:
        with contextlib.suppress(FileNotFoundError):
            source.unlink()
    return summary | {
        "file": path.name,
        "gguf_type": gguf_type,
        "bytes": path.stat().st_size,
        "tensor_types": tensor_types(path),
        "quantizer": f"llama.cpp ({llamacpp.version()})",
        "imatrix_rows": len(imatrix_rows) if imatrix_rows else None,
    }
