"""Write a merged model as one GGUF file for llama.cpp, Ollama and LM Studio, with the `gguf`
package's writer: architecture metadata under llama.cpp's keys, tensors under llama.cpp's names
(f16, bf16 or q8_0; norms and biases stay f32), the tokenizer (gguf_tokenizer.py) and sampling
defaults from the generation config. Tensors are converted and written one at a time.

Supported: Llama-family models (Llama 2/3, SmolLM2, Mistral), Mixtral (its experts as llama.cpp's
stacked `ffn_{gate,up,down}_exps`), Qwen2, Qwen3, Phi-3 (fused qkv / gate_up as llama.cpp keeps them),
Gemma 2 and Gemma 3 text models (norms stored as 1 + weight, sliding layers and their rope); what each
architecture assumes, and the refusals before anything is written, are in gguf_arch.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.export import gguf_tokenizer
from qlora_cli.export.gguf_arch import ARCHITECTURES, NORM_PLUS_ONE, check_architecture, head_dim, rope_parameters, sliding_layers, sliding_rope

WRITTEN_TYPES = ("f16", "bf16", "q8_0")  # written here, tensor by tensor
QUANTIZED_TYPES = ("q4_k_m", "q5_k_m", "q6_k", "q4_0")  # f16 written here, then llama.cpp's quantizer (export/quantize.py)
GGUF_TYPES = WRITTEN_TYPES + QUANTIZED_TYPES
# Bytes per parameter of each type (k-quants: llama.cpp's mix of block types for the _m variants).
BYTES_PER_PARAMETER = {"f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32, "q4_k_m": 4.9 / 8, "q5_k_m": 5.7 / 8, "q6_k": 6.6 / 8}


@dataclass(frozen=True)
class TensorPlan:
    name: str  # llama.cpp's
    source: str  # the state_dict key
    shape: tuple[int, ...]
    qtype: object  # gguf.GGMLQuantizationType
    rows: Optional[tuple[int, int]] = None  # a slice of the source's second-to-last axis (a fused tensor's half)


def gguf_file_name(gguf_type: str) -> str:
    return f"model-{gguf_type}.gguf"


def check_gguf_type(gguf_type: str) -> None:
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf-type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")


def permute_for_rope(weight: np.ndarray, heads: int) -> np.ndarray:
    """Within each head, interleave the two rotary halves: rows (0..d/2, d/2..d) -> (0, d/2, 1, d/2+1, ...).

    transformers' GGUF loader applies the inverse, so a load back recovers the HF layout.
    """
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(config, rope: dict) -> np.ndarray:
    """Per-frequency divisors of Llama 3.1+'s rope, which llama.cpp reads from `rope_freqs.weight`."""
    dim = head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    original = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for index in range(0, dim, 2):
        wavelength = 2 * math.pi * rope["rope_theta"] ** (index / dim)
        if wavelength < original / high:
            factors.append(1.0)
        elif wavelength > original / low:
            factors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def write_architecture(writer, config, arch: str, gguf_type: str, name: str) -> None:
    import gguf

    file_types = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_type("model")
    writer.add_name(name)
    writer.add_file_type(int(file_types[gguf_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    if arch == "gemma2":
        if config.attn_logit_softcapping:
            writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        writer.add_sliding_window(int(config.sliding_window))
    if arch == "gemma3":
        if getattr(config, "final_logit_softcapping", None):
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if any(sliding_layers(config)):
            writer.add_sliding_window(int(config.sliding_window))
            writer.add_sliding_window_pattern(sliding_layers(config))
            writer.add_rope_freq_base_swa(float(sliding_rope(config)["rope_theta"]))
    experts = getattr(config, "num_local_experts", None)
    if experts:
        writer.add_expert_count(int(experts))
        writer.add_expert_used_count(int(config.num_experts_per_tok))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(rope.get("original_max_position_embeddings", config.max_position_embeddings)))


def write_sampling_defaults(writer, generation_config) -> dict:
    """general.sampling.* from the generation config's explicitly set values (llama.cpp's defaults otherwise)."""
    if generation_config is None:
        return {}
    explicit = generation_config.to_diff_dict()
    written = {}
    for key, add in (("temperature", writer.add_sampling_temp), ("top_k", writer.add_sampling_top_k),
                     ("top_p", writer.add_sampling_top_p), ("min_p", writer.add_sampling_min_p),
                     ("repetition_penalty", writer.add_sampling_penalty_repeat)):
        value = explicit.get(key)
        if value is not None:
            add(int(value) if key == "top_k" else float(value))
            written[key] = value
    return written


def tensor_type(shape: tuple[int, ...], gguf_type: str):
    """f32 for vectors (norms, biases) as llama.cpp keeps them; q8_0 needs rows in blocks of 32."""
    import gguf

    kinds = gguf.GGMLQuantizationType
    if len(shape) < 2:
        return kinds.F32
    if gguf_type == "q8_0":
        return kinds.Q8_0 if shape[-1] % gguf.GGML_QUANT_SIZES[kinds.Q8_0][0] == 0 else kinds.F16
    return {"f16": kinds.F16, "bf16": kinds.BF16}[gguf_type]


def plan_tensors(state_dict: dict, config, arch: str, gguf_type: str) -> list[TensorPlan]:
    import gguf

    names = gguf.get_tensor_name_map(next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == arch), config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    plans = []
    for key, tensor in state_dict.items():
        if key == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        if key.endswith("rotary_emb.inv_freq"):
            continue
        shape = tuple(tensor.shape)
        experts = expert_plans(key, shape, gguf_type)
        if experts:
            plans += experts
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ModelError(f"GGUF export does not know where llama.cpp keeps {key} ({arch}); use --format hf")
        plans.append(TensorPlan(name, key, shape, tensor_type(shape, gguf_type)))
    return plans


def expert_plans(key: str, shape: tuple[int, ...], gguf_type: str) -> list[TensorPlan]:
    """transformers 5 keeps a MoE layer's experts stacked: gate_up_proj (experts, 2 x ff, hidden),
    gate first, and down_proj (experts, hidden, ff); llama.cpp wants ffn_gate_exps, ffn_up_exps
    and ffn_down_exps, each (experts, out, in)."""
    if not key.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
        return []
    block = int(key.split("layers.")[1].split(".")[0])
    if key.endswith("down_proj"):
        return [TensorPlan(f"blk.{block}.ffn_down_exps.weight", key, shape, tensor_type(shape, gguf_type))]
    half = shape[1] // 2
    part = (shape[0], half, shape[2])
    return [TensorPlan(f"blk.{block}.ffn_gate_exps.weight", key, part, tensor_type(part, gguf_type), (0, half)),
            TensorPlan(f"blk.{block}.ffn_up_exps.weight", key, part, tensor_type(part, gguf_type), (half, 2 * half))]


def tensor_bytes(shape: tuple[int, ...], qtype) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape[:-1]) * shape[-1] // block * size


def converted(tensor, plan: TensorPlan, config, permute: bool) -> np.ndarray:
    import gguf

    values = tensor.detach().float().cpu().numpy()
    if plan.rows is not None:
        values = values[..., plan.rows[0]:plan.rows[1], :]
    if config.model_type in NORM_PLUS_ONE and plan.source.endswith("norm.weight"):
        values = values + 1.0
    if permute and plan.source.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
        heads = config.num_attention_heads if "q_proj" in plan.source else (config.num_key_value_heads or config.num_attention_heads)
        values = permute_for_rope(values, heads)
    kinds = gguf.GGMLQuantizationType
    if plan.qtype == kinds.F32:
        return np.ascontiguousarray(values, dtype=np.float32)
    if plan.qtype == kinds.F16:
        return np.ascontiguousarray(values.astype(np.float16))
    return gguf.quants.quantize(np.ascontiguousarray(values), plan.qtype)


def expected_size(parameters: int, gguf_type: str) -> int:
    """Bytes the file takes, from the parameter count (headroom for metadata and vectors); a
    quantized type also needs room for the f16 file it is made from."""
    source = parameters * 2.0 if gguf_type in QUANTIZED_TYPES else 0
    return int(parameters * BYTES_PER_PARAMETER[gguf_type] + source) + 64 * 2**20


def write_gguf(model, tokenizer, path: Path, gguf_type: str, name: str) -> dict:
    """Write `model` (a transformers causal LM) and `tokenizer` to `path`; returns a summary."""
    import gguf

    if gguf_type not in WRITTEN_TYPES:
        raise ConfigError(f"GGUF type {gguf_type!r} is made by llama.cpp's quantizer (export/quantize.py), not written here")
    config = model.config.get_text_config()
    arch = check_architecture(model.config)
    permute = ARCHITECTURES[config.model_type][1]
    state_dict = model.state_dict()
    plans = plan_tensors(state_dict, config, arch, gguf_type)
    rope = rope_parameters(config)
    extra: dict[str, np.ndarray] = {}
    if rope["rope_type"] == "llama3":
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(config, rope)

    writer = gguf.GGUFWriter(path, arch)
    try:
        write_architecture(writer, config, arch, gguf_type, name)
        sampling = write_sampling_defaults(writer, getattr(model, "generation_config", None))
        tokenizer_summary = gguf_tokenizer.write_tokenizer(writer, tokenizer, config.vocab_size)
        for tensor_name, values in extra.items():
            writer.add_tensor_info(tensor_name, values.shape, values.dtype, values.nbytes)
        for plan in plans:
            writer.add_tensor_info(plan.name, plan.shape, np.dtype(np.float32), tensor_bytes(plan.shape, plan.qtype), raw_dtype=plan.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for values in extra.values():
            writer.write_tensor_data(values)
        for plan in plans:
            writer.write_tensor_data(converted(state_dict[plan.source], plan, config, permute))
    finally:
        writer.close()
    counts: dict[str, int] = {}
    for plan in plans:
        counts[plan.qtype.name] = counts.get(plan.qtype.name, 0) + 1
    return {
        "file": path.name,
        "gguf_type": gguf_type,
        "architecture": arch,
        "bytes": path.stat().st_size,
        "tensors": len(plans) + len(extra),
        "tensor_types": counts,
        "tokenizer": tokenizer_summary,
        "sampling_defaults": sampling,
    }


def display_name(base_model: str, run_dir: Path) -> str:
    return f"{Path(base_model).name} {run_dir.resolve().name}"
