"""The estimate's parameter and byte counts against the libraries themselves: transformers builds
the model from the same config, peft wraps it, bitsandbytes quantizes it, and the counts must agree
exactly (the demo-model checks live in tests/integration/test_estimate_demo_model.py)."""

from __future__ import annotations

import pytest

from qlora_cli.errors import ConfigError
from qlora_cli.estimate import GIB, Plan, estimate, from_config, resolve
from qlora_cli.estimate.memory import Trainable, base_weight_bytes, optimizer_state_bytes, quantized_linear_bytes, trainable_params
from qlora_cli.model.families import moe_targets

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MODEL_TYPES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe"]


def tiny_model(model_type: str, **overrides):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    fields = dict(TINY, **overrides)
    if model_type == "mixtral":
        fields.update(num_local_experts=4, num_experts_per_tok=2)
    if model_type == "qwen2_moe":
        fields.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48, shared_expert_intermediate_size=80)
    config = AutoConfig.for_model(model_type, **fields)
    return AutoModelForCausalLM.from_config(config), config.to_dict()


def peft_trainable(model, **lora) -> int:
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    return sum(p.numel() for p in wrapped.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_total_params_equal_transformers_model(model_type):
    model, config = tiny_model(model_type)
    arch = from_config(config, model_type, "test")
    assert arch.total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_all_linear_lora_count_equals_peft(model_type):
    model, config = tiny_model(model_type)
    arch = from_config(config, model_type, "test")
    moe = moe_targets(model)  # what `qlora train` makes of all-linear on an MoE base
    expected = peft_trainable(model, r=4, target_modules=moe[0] if moe else "all-linear", lora_dropout=0.0)
    assert trainable_params(arch, Plan(lora_r=4, target_modules="all-linear", lora_dropout=0.0)) == expected


@pytest.mark.parametrize(
    "lora",
    [
        dict(r=1, target_modules=["q_proj", "v_proj"]),
        dict(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
        dict(r=16, target_modules="all-linear"),
        dict(r=64, target_modules=["gate_proj", "down_proj"]),
        dict(r=4, target_modules="all-linear", use_dora=True),
        dict(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"]),
        dict(r=4, target_modules=["self_attn.q_proj", "lm_head"]),
    ],
    ids=["r1-qv", "r8-attn", "r16-all", "r64-mlp", "dora", "save-head", "dotted+head"],
)
def test_llama_lora_variants_equal_peft(lora):
    model, config = tiny_model("llama", hidden_size=16, intermediate_size=32, head_dim=4)
    arch = from_config(config, "tiny", "test")
    plan = Plan(
        lora_r=lora["r"],
        target_modules=lora["target_modules"] if isinstance(lora["target_modules"], str) else tuple(lora["target_modules"]),
        use_dora=lora.get("use_dora", False),
        modules_to_save=tuple(lora.get("modules_to_save", ())),
    )
    assert trainable_params(arch, plan) == peft_trainable(model, **lora)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_modes_equal_peft_on_qwen2(bias):
    model, config = tiny_model("qwen2")
    arch = from_config(config, "qwen2", "test")
    plan = Plan(lora_r=2, target_modules=("q_proj", "o_proj"), lora_bias=bias)
    assert trainable_params(arch, plan) == peft_trainable(model, r=2, target_modules=["q_proj", "o_proj"], bias=bias)


@pytest.mark.parametrize("double_quant", [True, False])
def test_4bit_bytes_equal_bitsandbytes(double_quant):
    """Quantize one 256 x 576 weight with bitsandbytes and count what it stores."""
    import bitsandbytes.functional as bnbf
    import torch

    weight = torch.randn(256, 576, dtype=torch.bfloat16)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant, quant_type="nf4")
    stored = [packed, state.absmax, state.code] + ([state.state2.absmax, state.offset] if double_quant else [])
    real = sum(t.numel() * t.element_size() for t in stored)
    assert quantized_linear_bytes(576, 256, 4, double_quant) == real


def test_bits_per_parameter_match_the_qlora_paper():
    """QLoRA: double quant takes the constants from 32/64 = 0.5 to 8/64 + 32/(64*256) = 0.127 bit/param."""
    n = 8192 * 28672
    without = quantized_linear_bytes(8192, 28672, 4, False) * 8 / n
    with_dq = quantized_linear_bytes(8192, 28672, 4, True) * 8 / n
    assert without == pytest.approx(4.5, abs=1e-3)
    assert with_dq == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-3)
    assert quantized_linear_bytes(8192, 28672, 8, False) == n + 4 * 28672


def test_70b_4bit_base_weights_land_near_the_qlora_paper():
    """Llama 70B in NF4 with double quant: ~35 GB of 4-bit linears plus ~2 GB of 16-bit embeddings/head.
    QLoRA (Dettmers et al. 2023) fits the 65B model, weights and training state, in 48 GB."""
    arch = resolve("meta-llama/Llama-3.3-70B-Instruct")
    weights = sum(base_weight_bytes(arch, Plan()).values())
    assert 35e9 <= weights <= 40e9
    paper_65b = sum(base_weight_bytes(resolve("huggyllama/llama-65b"), Plan()).values())
    assert 33e9 <= paper_65b <= 36e9  # 65.2B params at ~4.13 bits + 0.5B 16-bit embeddings


def test_16bit_base_is_two_bytes_per_parameter():
    arch = resolve("Qwen/Qwen2.5-7B")
    assert sum(base_weight_bytes(arch, Plan(bits=16)).values()) == 2 * arch.total_params()


def test_optimizer_states_follow_bitsandbytes_rules():
    big, small = Trainable("a", 65536, 1, 4), Trainable("b", 1024, 1, 4)
    assert optimizer_state_bytes([big], "adamw_torch") == 2 * 65536 * 4
    assert optimizer_state_bytes([big], "paged_adamw_32bit") == 2 * 65536 * 4
    assert optimizer_state_bytes([big], "paged_adamw_8bit") == 2 * (65536 + 4 * 256)
    assert optimizer_state_bytes([small], "adamw_8bit") == 2 * 1024 * 4  # under min_8bit_size: fp32 states
    assert optimizer_state_bytes([Trainable("c", 100, 1, 2)], "adamw_torch") == 2 * 100 * 2  # states in param dtype


def test_llama_3_1_8b_r16_all_linear_trainable_count():
    """The figure peft prints for Llama-3.1-8B, r=16, all-linear: 41,943,040 trainable."""
    result = estimate(resolve("meta-llama/Llama-3.1-8B-Instruct"), Plan(lora_r=16))
    assert result.trainable_params == 41_943_040
    assert result.breakdown["adapter_weights"] == 41_943_040 * 4  # fp32 adapters
    assert 5.0 * GIB < result.breakdown["base_weights"] < 5.6 * GIB


def test_unknown_target_module_names_the_layers():
    with pytest.raises(ConfigError, match="q_prj.*its linear layers are: q_proj, k_proj"):
        trainable_params(resolve("meta-llama/Llama-3.1-8B"), Plan(target_modules=("q_prj",)))
