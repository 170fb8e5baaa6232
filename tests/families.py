"""Tiny random-weight models of every architecture family we claim, built from their config
classes (no download), so estimate, train, merge and export can be checked per family in seconds.

`build_family(name, vocab_size)` returns an eval-mode model; `save_family(name, folder, tokenizer)`
writes it with the tokenizer as a Hugging Face folder. Shapes: hidden 64, 2 layers, 4 query / 2
key-value heads, so bitsandbytes' 64-element blocks divide every weight; initializer_range 0.2 as
in build_tiny_llama (an adapter can reach confident logits).
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_multimodal", "phi3", "mixtral", "qwen2_moe")
MOE_FAMILIES = ("mixtral", "qwen2_moe")

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
    tie_word_embeddings=False,
    initializer_range=0.2,
)


def family_config(name: str, vocab_size: int):
    """The config of a tiny `name` model: its own config class with the shared tiny shapes."""
    import transformers as tf

    common = dict(_COMMON, vocab_size=vocab_size)
    if name == "llama":
        return tf.LlamaConfig(**common)
    if name == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if name == "qwen2":
        return tf.Qwen2Config(**common, use_sliding_window=False)
    if name == "qwen3":
        return tf.Qwen3Config(**common, head_dim=16, use_sliding_window=False)
    if name == "gemma2":
        # Soft-capping on both the attention scores and the final logits, as the released models.
        return tf.Gemma2Config(**common, head_dim=16, attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096)
    if name == "gemma3":
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=4096)
    if name == "gemma3_multimodal":
        # As google/gemma-3-4b-it and larger ship: Gemma3ForConditionalGeneration (model_type gemma3), the
        # text config nested, a SigLIP vision tower (here one tiny layer) and its projector.
        text = tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=4096)
        vision = tf.SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
        return tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=vocab_size - 1,
                               boi_token_index=vocab_size - 2, eoi_token_index=vocab_size - 3, tie_word_embeddings=False, initializer_range=0.2)
    if name == "phi3":
        # Fused qkv_proj and gate_up_proj, the layout Phi-3 / Phi-4 checkpoints ship.
        return tf.Phi3Config(**common)
    if name == "mixtral":
        return tf.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    if name == "qwen2_moe":
        return tf.Qwen2MoeConfig(
            **common, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, shared_expert_intermediate_size=128,
            use_sliding_window=False,
        )
    raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}")


def build_family(name: str, vocab_size: int, seed: int = 0):
    """A tiny random-weight model of family `name`, in eval mode, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_config(name, vocab_size)).eval()


def save_family(name: str, folder: Path, tokenizer, seed: int = 0) -> Path:
    """Write a tiny `name` model and `tokenizer` to `folder` as a from_pretrained-able folder."""
    model = build_family(name, len(tokenizer), seed=seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
