"""What each llama.cpp architecture we write assumes, and whether a model's settings fit it: the
architecture name per transformers model_type, rope variants and the settings the file carries,
the MLP activation each graph uses, and the family rules (Gemma 2 / Gemma 3). A setting that
changes what the model computes and that llama.cpp would not apply from the file (a sliding window,
another activation, an unwritten rope setting) refuses the export before anything is written.
"""

from __future__ import annotations

from typing import Optional

from qlora_cli.errors import ModelError

# transformers model_type -> (llama.cpp architecture, q/k rows permuted for llama.cpp's rope).
# llama.cpp runs Llama and Mistral with interleaved ("normal") rope, so convert_hf_to_gguf.py
# reorders the rows of q_proj / k_proj per head; Qwen2 runs NeoX rope on the HF layout as it is.
ARCHITECTURES = {
    "llama": ("llama", True), "mistral": ("llama", True), "mixtral": ("llama", True),
    "qwen2": ("qwen2", False), "qwen3": ("qwen3", False), "phi3": ("phi3", False), "gemma2": ("gemma2", False),
    "gemma3_text": ("gemma3", False),
}
# Gemma's RMSNorm multiplies by (1 + weight), llama.cpp's by weight: the file stores 1 + weight.
NORM_PLUS_ONE = ("gemma2", "gemma3_text")
# Rope variants llama.cpp reads from metadata (plus llama3's per-frequency factors as a tensor),
# with the settings of each that the file carries; any other setting changes the computation
# unless it holds the value llama.cpp assumes (ROPE_ASSUMED).
ROPE_CARRIED = {
    "default": {"rope_type", "rope_theta"},
    "linear": {"rope_type", "rope_theta", "factor"},
    "llama3": {"rope_type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"},
    "yarn": {"rope_type", "rope_theta", "factor", "original_max_position_embeddings"},
}
ROPE_TYPES = tuple(ROPE_CARRIED)
ROPE_ASSUMED = {"beta_fast": 32, "beta_slow": 1, "partial_rotary_factor": 1.0, "truncate": True}
# The MLP activation each llama.cpp graph uses, whatever the file says.
ACTIVATIONS = ("silu", "swish")
ARCH_ACTIVATIONS = {"gemma2": ("gelu_pytorch_tanh", "gelu_tanh"), "gemma3": ("gelu_pytorch_tanh", "gelu_tanh")}


def check_architecture(config) -> str:
    """llama.cpp's architecture name for this model config, or a one-line ModelError."""
    if getattr(config, "vision_config", None) is not None:
        raise ModelError(
            f"GGUF export writes text models; this {config.model_type} model has a vision tower, which llama.cpp keeps in a "
            "separate mmproj file: use --format hf and llama.cpp's convert_hf_to_gguf.py (with --mmproj for the vision part)"
        )
    config = config.get_text_config()
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        names = ", ".join(getattr(config, "architectures", None) or [])
        raise ModelError(
            f"GGUF export supports {', '.join(ARCHITECTURES)} models; this model is {model_type!r}{f' ({names})' if names else ''}. "
            "Use --format hf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    rope = rope_parameters(config)
    if rope.get("rope_type", "default") not in ROPE_TYPES:
        raise ModelError(f"GGUF export cannot describe rope type {rope['rope_type']!r}; use --format hf")
    arch = ARCHITECTURES[model_type][0]
    problems = uncarried_settings(config, arch)
    if problems:
        raise ModelError(
            f"GGUF export: {problems[0]}, so the file would compute something other than the model; "
            "use --format hf (transformers and vLLM run the checkpoint as it is)"
        )
    return arch


def sliding_window(config) -> Optional[int]:
    """The window (in tokens) some layer of the model attends within, when it is shorter than the
    context (Mistral 7B v0.1: 4096 of 32768; Qwen2 with use_sliding_window), else None."""
    config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or (layer_types is not None and "sliding_attention" not in layer_types):
        return None
    return int(window) if window < config.max_position_embeddings else None


def uncarried_settings(config, arch: str) -> list[str]:
    """Settings that change what the model computes but that llama.cpp's `arch` graph would not
    apply from this file: each says what it is (empty when the file carries everything)."""
    config = config.get_text_config()
    problems = []
    window = sliding_window(config)
    if arch == "gemma2":
        problems += gemma2_settings(config)
        window = None  # llama.cpp's gemma2 attends within the file's window on every other layer, as Gemma 2 does
    if arch == "gemma3":
        problems += gemma3_settings(config)
        window = None  # the file names the sliding layers (attention.sliding_window_pattern) and their window
    if window is not None:
        problems.append(
            f"this {config.model_type} model attends within a sliding window of {window} tokens (context {config.max_position_embeddings}), "
            f"which llama.cpp's {arch} architecture does not apply: from token {window + 1} on it attends to every earlier token"
        )
    activation = getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")
    expected = ARCH_ACTIVATIONS.get(arch, ACTIVATIONS)
    if activation not in expected:
        problems.append(f"this model's MLP activation is {activation!r}, and llama.cpp's {arch} architecture always uses {expected[0]}")
    rope = rope_parameters(config)
    carried = ROPE_CARRIED.get(rope["rope_type"], set())
    for key, value in sorted(rope.items()):
        if key not in carried and value is not None and ROPE_ASSUMED.get(key) != value:
            problems.append(f"rope setting {key}={value!r} ({rope['rope_type']}) has no place in llama.cpp's {arch} metadata")
    return problems


def gemma2_settings(config) -> list[str]:
    """What llama.cpp's gemma2 graph assumes: tied output, the query scale of its model size, and
    sliding layers alternating from the first (its default pattern)."""
    problems = []
    if not getattr(config, "tie_word_embeddings", True):
        problems.append("this gemma2 model has its own lm_head, and llama.cpp's gemma2 architecture reuses the token embeddings as output")
    scale = config.query_pre_attn_scalar
    expected = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 46 else head_dim(config)
    if scale != expected:
        problems.append(f"query_pre_attn_scalar={scale}, and llama.cpp's gemma2 architecture scales queries by 1/sqrt({expected})")
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any((kind == "sliding_attention") != (index % 2 == 0) for index, kind in enumerate(layer_types)):
        problems.append("this gemma2 model's sliding layers do not alternate from the first, as llama.cpp's gemma2 architecture assumes")
    return problems


def gemma3_settings(config) -> list[str]:
    """What llama.cpp's gemma3 graph assumes: queries scaled by 1/sqrt(head_dim) (the 62-layer 27B:
    1/sqrt(hidden / heads)), no attention soft-capping, sliding layers with plain rope (their own base)."""
    problems = []
    scale = config.query_pre_attn_scalar
    expected = config.hidden_size // config.num_attention_heads if config.num_hidden_layers == 62 else head_dim(config)
    if scale != expected:
        problems.append(f"query_pre_attn_scalar={scale}, and llama.cpp's gemma3 architecture scales queries by 1/sqrt({expected})")
    if getattr(config, "attn_logit_softcapping", None):
        problems.append("this gemma3 model soft-caps attention scores, which llama.cpp's gemma3 architecture does not")
    sliding = sliding_rope(config)
    for key, value in sorted(sliding.items()):
        if key not in ("rope_type", "rope_theta") and value is not None and ROPE_ASSUMED.get(key) != value:
            problems.append(f"sliding-layer rope setting {key}={value!r}, and llama.cpp's gemma3 applies no scaling on sliding layers")
    if sliding.get("rope_type", "default") != "default":
        problems.append(f"sliding-layer rope type {sliding['rope_type']!r}, and llama.cpp's gemma3 applies plain rope on sliding layers")
    return problems


def sliding_rope(config) -> dict:
    """The rope of a Gemma 3 model's sliding layers (transformers 5 keeps one rope per layer type)."""
    rope = getattr(config, "rope_parameters", None) or {}
    sliding = dict(rope.get("sliding_attention") or {})
    sliding.setdefault("rope_theta", getattr(config, "rope_local_base_freq", 10000.0))
    return sliding


def sliding_layers(config) -> list[bool]:
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    return [kind == "sliding_attention" for kind in layer_types]


def rope_parameters(config) -> dict:
    """The rope of the (full-attention) layers that llama.cpp's main rope metadata describes."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope = dict(rope.get("full_attention") or {}) if "full_attention" in rope else dict(rope)
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    legacy_name = rope.pop("type", None)  # transformers 4's spelling, still in many configs
    rope["rope_type"] = rope.get("rope_type") or legacy_name or "default"
    return rope


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
