"""Trainable tensors of every PEFT method, as peft (or our bottleneck adapter) creates them, and
of unfrozen modules for sparse fine-tuning. Pure arithmetic on an Architecture and a Plan; each
rule names the library code it mirrors. LoRA's own rules are in memory.py.
"""

from __future__ import annotations

import fnmatch

from qlora_cli.errors import ConfigError
from qlora_cli.estimate import memory
from qlora_cli.estimate.architecture import Architecture
from qlora_cli.estimate.memory import ADAPTER_BYTES, Trainable
from qlora_cli.estimate.plan import Plan

# peft's TRANSFORMERS_MODELS_TO_IA3_{TARGET,FEEDFORWARD}_MODULES_MAPPING for the families we model
_IA3_TARGETS = {"llama": ("k_proj", "v_proj", "down_proj"), "mistral": ("k_proj", "v_proj", "down_proj")}
_IA3_DEFAULT = ("q_proj", "v_proj", "down_proj")  # qwen2/3, gemma 1-3
_IA3_FEEDFORWARD = ("down_proj",)


def adapted_layers(arch: Architecture, plan: Plan) -> int:
    return len(plan.layers) if plan.layers else arch.num_layers


def ia3_tensors(arch: Architecture, plan: Plan) -> list[Trainable]:
    """IA3 (peft tuners/ia3): one fp32 vector per target linear: in_features for a feed-forward module
    (it scales the input), out_features otherwise (it scales the output)."""
    if arch.model_type in ("phi3", "mixtral") and plan.ia3_targets is None:
        raise ConfigError(f"no default IA3 modules for {arch.model_type}; set adapter.ia3.target_modules and feedforward_modules")
    targets = plan.ia3_targets or _IA3_TARGETS.get(arch.model_type, _IA3_DEFAULT)
    feedforward = plan.ia3_feedforward if plan.ia3_feedforward is not None else tuple(n for n in _IA3_FEEDFORWARD if n in targets)
    layers = adapted_layers(arch, plan)
    tensors = []
    for linear in arch.linears:
        if linear.name in targets:
            width = linear.in_features if linear.name in feedforward else linear.out_features
            tensors.append(Trainable(f"{linear.name}.ia3_l", width, layers, ADAPTER_BYTES))
    return tensors


def prompt_tensors(arch: Architecture, plan: Plan) -> list[Trainable]:
    """Prompt tuning: an n x hidden embedding. P-tuning (MLP encoder): that embedding plus
    Linear(hidden, e), Linear(e, e), Linear(e, hidden) with biases. Prefix tuning: an n x (layers x 2 x kv)
    embedding of keys and values (kv = the key/value width, peft's GQA rule), or with projection an
    n x kv embedding, Linear(kv, e) and Linear(e, layers x 2 x kv) with biases."""
    n, h, e = plan.num_virtual_tokens, arch.hidden_size, plan.encoder_hidden_size
    if plan.method == "prompt_tuning":
        return [Trainable("prompt embedding", n * h, 1, ADAPTER_BYTES)]
    if plan.method == "p_tuning":
        return [Trainable("prompt embedding", n * h, 1, ADAPTER_BYTES),
                Trainable("prompt encoder MLP", h * e + e + e * e + e + e * h + h, 1, ADAPTER_BYTES)]
    kv = arch.kv_dim
    keys_values = arch.num_layers * 2 * kv
    if not plan.prefix_projection:
        return [Trainable("prefix keys/values", n * keys_values, 1, ADAPTER_BYTES)]
    return [Trainable("prefix embedding", n * kv, 1, ADAPTER_BYTES),
            Trainable("prefix projection MLP", kv * e + e + e * keys_values + keys_values, 1, ADAPTER_BYTES)]


def bottleneck_tensors(arch: Architecture, plan: Plan) -> list[Trainable]:
    """Our bottleneck adapter (qlora_cli/model/adapters/bottleneck.py): Linear(hidden, size) and Linear(size, hidden), with
    biases, per placement (attention, mlp) per adapted layer, in fp32."""
    h, size = arch.hidden_size, plan.bottleneck_size
    per_adapter = h * size + size + size * h + h
    return [Trainable(f"bottleneck after {place}", per_adapter, adapted_layers(arch, plan), ADAPTER_BYTES) for place in plan.bottleneck_placement]


def module_params(arch: Architecture) -> dict[str, int]:
    """Parameter count of every module a Llama-like model names, for unfreeze patterns."""
    modules = {"model.embed_tokens": arch.vocab_size * arch.hidden_size, "model.norm": arch.hidden_size}
    if not arch.tie_embeddings:
        modules["lm_head"] = arch.vocab_size * arch.hidden_size
    for index in range(arch.num_layers):
        prefix = f"model.layers.{index}"
        for linear in arch.linears:
            block = "self_attn" if linear.role.startswith("attn") else "mlp"
            modules[f"{prefix}.{block}.{linear.name}"] = linear.in_features * linear.out_features + (linear.out_features if linear.bias else 0)
        for norm in ("input_layernorm", "post_attention_layernorm")[: arch.norms_per_layer]:
            modules[f"{prefix}.{norm}"] = arch.hidden_size
    return modules


def unfrozen_tensors(arch: Architecture, plan: Plan) -> list[Trainable]:
    """Modules trained in full (peft modules_to_save: a trainable copy in the base dtype)."""
    if not plan.unfreeze:
        return []
    modules = module_params(arch)
    chosen: dict[str, int] = {}
    for pattern in plan.unfreeze:
        hits = {name: count for name, count in modules.items() if fnmatch.fnmatchcase(name, pattern)}
        if not hits:
            raise ConfigError(f"adapter.unfreeze: {pattern!r} matches no module the estimate knows (e.g. model.layers.0.input_layernorm, model.norm)")
        chosen.update(hits)
    if plan.bits in (4, 8) and any(name.rpartition(".")[2] in arch.linear_names() for name in chosen):
        raise ConfigError("adapter.unfreeze names quantized linear layers, which cannot be trained; unfreeze norms or embeddings, or use 16 bits")
    return [Trainable(f"{name} (unfrozen)", count, 1, plan.dtype_bytes) for name, count in chosen.items()]


# Each adapter method's trainable tensors, keyed as model/adapters/registry.py keys the methods
# (tests/unit/test_adapter_registry.py checks that both name the same methods).
METHOD_TENSORS = {
    "lora": memory.trainable_tensors,
    "ia3": ia3_tensors,
    "prompt_tuning": prompt_tensors,
    "prefix_tuning": prompt_tensors,
    "p_tuning": prompt_tensors,
    "bottleneck": bottleneck_tensors,
}


def trainable_tensors(arch: Architecture, plan: Plan) -> list[Trainable]:
    """Every tensor the optimizer updates under the plan's method."""
    return METHOD_TENSORS[plan.method](arch, plan) + unfrozen_tensors(arch, plan)


def trainable_params(arch: Architecture, plan: Plan) -> int:
    return sum(t.numel * t.count for t in trainable_tensors(arch, plan))
