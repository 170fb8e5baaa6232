"""A LoRA adapter as a GGUF file for llama.cpp's `--lora` (and Ollama's `ADAPTER`), laid out as
llama.cpp's convert_lora_to_gguf.py lays it out: `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha`, and for every adapted weight W (under llama.cpp's tensor name) the pair
`W.lora_a` (rank x in) and `W.lora_b` (out x rank), in f32; llama.cpp adds scale * alpha / rank *
B A to W. Where our base GGUF permutes q/k rows for llama.cpp's rope, B's rows are permuted the same.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qlora_cli.errors import ModelError
from qlora_cli.export import gguf_arch, gguf_writer


def adapter_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    path = run_dir / "adapter_model.safetensors"
    if not path.is_file():
        raise ModelError(f"{run_dir} has no adapter_model.safetensors; --format gguf-lora needs a LoRA adapter saved by qlora train")
    return load_file(str(path))


def check_lora(adapter_config: dict) -> None:
    """What llama.cpp's LoRA loader cannot apply, as a one-line error naming the way out."""
    kind = str(adapter_config.get("peft_type", "")).upper()
    if kind != "LORA":
        raise ModelError(f"--format gguf-lora writes LoRA adapters; this run trained {kind or 'an unknown adapter'}: use --format gguf (merged)")
    if adapter_config.get("use_dora"):
        raise ModelError("llama.cpp applies plain LoRA, not DoRA's rescaled weights: use --format gguf (merged) for this run")
    if adapter_config.get("modules_to_save"):
        raise ModelError(f"llama.cpp's --lora carries only low-rank pairs, not the fully trained {adapter_config['modules_to_save']}: "
                         "use --format gguf (merged) for this run")


def effective_alpha(adapter_config: dict) -> float:
    """llama.cpp scales by alpha / rank; rsLoRA scales by alpha / sqrt(rank): the alpha that gives it."""
    rank, alpha = int(adapter_config["r"]), float(adapter_config["lora_alpha"])
    return alpha * math.sqrt(rank) if adapter_config.get("use_rslora") else alpha


def write_lora_gguf(run_dir: Path, adapter_config: dict, base_config, path: Path, name: str) -> dict:
    """Write the run's LoRA adapter to `path` for a base GGUF written by gguf_writer from `base_config`."""
    import gguf

    check_lora(adapter_config)
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ModelError("llama.cpp's LoRA file has one alpha for all layers; this adapter sets per-layer ranks or alphas: use --format gguf")
    config = base_config.get_text_config()
    arch = gguf_arch.check_architecture(base_config)
    permute = gguf_arch.ARCHITECTURES[config.model_type][1]
    names = gguf.get_tensor_name_map(next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch), config.num_hidden_layers)
    tensors = adapter_tensors(run_dir)
    pairs = {}
    for key, tensor in tensors.items():
        module, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ModelError(f"llama.cpp's --lora cannot carry {key}: use --format gguf (merged) for this run")
        target = names.get_name(module + ".weight", try_suffixes=(".weight",))
        if target is None:
            raise ModelError(f"llama.cpp has no tensor for the adapted {module} ({arch}): use --format gguf (merged)")
        values = tensor.detach().float().cpu().numpy()
        if kind == "B.weight" and permute and module.endswith(("self_attn.q_proj", "self_attn.k_proj")):
            heads = config.num_attention_heads if module.endswith("q_proj") else (config.num_key_value_heads or config.num_attention_heads)
            values = gguf_writer.permute_for_rope(values, heads)
        pairs[f"{target}.lora_{kind[0].lower()}"] = np.ascontiguousarray(values, dtype=np.float32)
    writer = gguf.GGUFWriter(path, arch)
    try:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_name(name)
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, effective_alpha(adapter_config))
        for tensor_name in sorted(pairs):
            writer.add_tensor(tensor_name, pairs[tensor_name])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return {"file": path.name, "bytes": path.stat().st_size, "tensors": len(pairs), "rank": int(adapter_config["r"]),
            "alpha": effective_alpha(adapter_config), "architecture": arch}
