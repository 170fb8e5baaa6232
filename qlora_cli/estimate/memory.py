"""Bytes that live for the whole run: the frozen base, the adapter, its gradients and the optimizer
states. Pure arithmetic on an Architecture and a Plan; each rule names the library code it mirrors.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import ceil

from qlora_cli.errors import ConfigError
from qlora_cli.estimate.architecture import PER_EXPERT, Architecture, Linear
from qlora_cli.estimate.plan import Plan

NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
NESTED_BLOCK = 256  # double quant: the 8-bit absmaxes are themselves quantized in blocks of 256
OPTIMIZER_8BIT_BLOCK = 256  # bnb 8-bit optimizers: one fp32 absmax per 256 state values
OPTIMIZER_8BIT_MIN_SIZE = 4096  # bnb keeps 32-bit states for tensors smaller than this (min_8bit_size)
ADAPTER_BYTES = 4  # peft casts LoRA/DoRA weights to fp32 (get_peft_model(autocast_adapter_dtype=True))


def quantized_linear_bytes(in_features: int, out_features: int, bits: int, double_quant: bool) -> int:
    """Stored bytes of one bitsandbytes-quantized weight.

    4-bit (Linear4bit): two 4-bit codes per uint8 byte -> n/2, plus one absmax per 64-block:
      without double quant an fp32 absmax           -> 4/64 B = 0.5 bit/param;
      with double quant an uint8 absmax + one fp32 absmax per 256 blocks + an fp32 offset
                                                    -> 1/64 + 4/(64*256) B = 0.127 bit/param;
      plus the 16-entry fp32 code table each QuantState holds (64 B).
    8-bit (Linear8bitLt): int8 weight (n B) plus an fp32 scale per output row (SCB).
    """
    n = in_features * out_features
    if bits == 4:
        blocks = ceil(n / NF4_BLOCK)
        if double_quant:
            constants = blocks + 4 * ceil(blocks / NESTED_BLOCK) + 4
        else:
            constants = 4 * blocks
        return ceil(n / 2) + constants + 16 * 4
    if bits == 8:
        return n + 4 * out_features
    raise ValueError(f"bits must be 4 or 8, not {bits}")


def base_weight_bytes(arch: Architecture, plan: Plan) -> dict[str, int]:
    """The frozen base by part. bitsandbytes replaces nn.Linear layers only; everything else (embeddings,
    an untied lm_head, which transformers never quantizes, norms, biases, fused MoE experts) stays 16-bit."""
    half = 4 if plan.upcast_frozen and plan.bits in (4, 8) else plan.dtype_bytes
    layers = arch.num_layers
    if plan.bits in (4, 8):
        linears = sum(quantized_linear_bytes(l.in_features, l.out_features, plan.bits, plan.double_quant) for l in arch.linears)
    else:
        linears = sum(l.in_features * l.out_features * half for l in arch.linears)
    experts = sum(e.num_experts * e.in_features * e.out_features for e in arch.experts) * half
    experts_quantized = arch.expert_layout == PER_EXPERT and plan.bits in (4, 8)
    if experts_quantized:  # nn.Linear per expert: quantized like the other linears (gate_up = w1 + w3)
        experts = sum(e.num_experts * quantized_linear_bytes(e.in_features, e.out_features, plan.bits, plan.double_quant) for e in arch.experts)
    parts = {
        "quantized linears" if plan.bits in (4, 8) else "linears": layers * linears,
        "embeddings + lm_head": arch.embedding_params() * half,
        "norms + biases": (arch.norm_params() + layers * sum(l.out_features for l in arch.linears if l.bias)) * half,
    }
    if arch.experts:
        label = f"MoE experts ({plan.bits}-bit, nn.Linear per expert)" if experts_quantized else "MoE experts + router (16-bit, fused 3-D tensors)"
        parts[label] = layers * (experts + arch.router_experts * arch.hidden_size * half)
    if arch.extra_params:
        parts["other (16-bit)"] = arch.extra_params * half
    return parts


@dataclass(frozen=True)
class Trainable:
    """`count` identical trainable tensors of `numel` elements stored in `bytes_per_element`."""

    name: str
    numel: int
    count: int
    bytes_per_element: int


def resolve_targets(arch: Architecture, target_modules) -> tuple[list[Linear], list[str], list[str]]:
    """(decoder linears LoRA wraps, other wrapped modules, unmatched names), matching the way peft does.

    peft matches a module whose name equals a key or ends with "." + key; `all-linear` means every
    nn.Linear except the output head (on MoE bases never the router or the fused experts: see
    model/families.moe_targets).
    """
    if target_modules == "all-linear":
        return list(arch.linears), [], []
    leaves = {key.rpartition(".")[2]: key for key in target_modules}
    linears = [l for l in arch.linears if l.name in leaves]
    others = [leaf for leaf in ("lm_head", "embed_tokens") if leaf in leaves]
    unmatched = [key for leaf, key in leaves.items() if leaf not in arch.linear_names() and leaf not in others]
    if not linears and not others:
        raise ConfigError(
            f"lora.target_modules {list(target_modules)} match no layer of {arch.name}; "
            f"its linear layers are: {', '.join(arch.linear_names())} (or use all-linear)"
        )
    return linears, others, unmatched


def _modules_to_save(arch: Architecture, names: tuple[str, ...], half: int) -> list[Trainable]:
    by_linear = {l.name: l for l in arch.linears}
    saved = []
    for name in names:
        leaf = name.rpartition(".")[2]
        if leaf in ("lm_head", "embed_tokens"):
            saved.append(Trainable(f"{leaf} (modules_to_save)", arch.vocab_size * arch.hidden_size, 1, half))
        elif leaf in by_linear:
            linear = by_linear[leaf]
            numel = linear.in_features * linear.out_features + (linear.out_features if linear.bias else 0)
            saved.append(Trainable(f"{leaf} (modules_to_save)", numel, arch.num_layers, half))
        elif leaf in ("input_layernorm", "post_attention_layernorm"):
            saved.append(Trainable(f"{leaf} (modules_to_save)", arch.hidden_size, arch.num_layers, half))
        elif leaf == "norm":
            saved.append(Trainable("norm (modules_to_save)", arch.hidden_size, 1, half))
        else:
            raise ConfigError(
                f"lora.modules_to_save: {name!r} is not a module the estimate knows; use lm_head, embed_tokens, "
                f"a norm, or one of {', '.join(arch.linear_names())}"
            )
    return saved


def trainable_tensors(arch: Architecture, plan: Plan) -> list[Trainable]:
    """Every tensor the optimizer updates, as peft creates them.

    LoRA on Linear(in, out): A is r x in, B is out x r -> r * (in + out) parameters (fp32);
    DoRA adds a magnitude vector of `out`; bias="all" trains every bias, "lora_only" those of the
    adapted layers; modules_to_save trains a full copy of each named module in the base dtype.
    """
    r, half = plan.lora_r, plan.dtype_bytes
    layers = len(plan.layers) if plan.layers else arch.num_layers  # adapter.layers_to_transform
    linears, others, _ = resolve_targets(arch, plan.target_modules)
    tensors = []
    for linear in linears:
        tensors.append(Trainable(f"{linear.name}.lora_A", r * linear.in_features, layers, ADAPTER_BYTES))
        tensors.append(Trainable(f"{linear.name}.lora_B", r * linear.out_features, layers, ADAPTER_BYTES))
        if plan.use_dora:
            tensors.append(Trainable(f"{linear.name}.lora_magnitude", linear.out_features, layers, ADAPTER_BYTES))
    for leaf in ("lm_head", "embed_tokens"):
        if leaf in others:  # lm_head: Linear(hidden, vocab); embed_tokens: LoRA Embedding (r x vocab, hidden x r)
            tensors.append(Trainable(f"{leaf}.lora_A", r * (arch.hidden_size if leaf == "lm_head" else arch.vocab_size), 1, ADAPTER_BYTES))
            tensors.append(Trainable(f"{leaf}.lora_B", r * (arch.vocab_size if leaf == "lm_head" else arch.hidden_size), 1, ADAPTER_BYTES))
    biased = [l for l in (arch.linears if plan.lora_bias == "all" else linears if plan.lora_bias == "lora_only" else []) if l.bias]
    tensors.extend(Trainable(f"{l.name}.bias", l.out_features, layers, half) for l in biased)
    tensors.extend(_modules_to_save(arch, plan.modules_to_save, half))
    return tensors


def trainable_params(arch: Architecture, plan: Plan) -> int:
    return sum(t.numel * t.count for t in trainable_tensors(arch, plan))


def adapter_bytes(tensors: list[Trainable]) -> int:
    return sum(t.numel * t.count * t.bytes_per_element for t in tensors)


def gradient_bytes(tensors: list[Trainable]) -> int:
    """One gradient per trainable tensor, in the tensor's own dtype (accumulation happens in place)."""
    return adapter_bytes(tensors)


def optimizer_state_bytes(tensors: list[Trainable], optimizer: str) -> int:
    """AdamW keeps two states (exp_avg, exp_avg_sq) per parameter.

    adamw_torch: states in the parameter's dtype (torch.zeros_like). paged_adamw_32bit: fp32 states.
    adamw_8bit / paged_adamw_8bit (bitsandbytes): uint8 states + an fp32 absmax per 256 values each,
    but tensors under 4096 elements keep fp32 states (bnb Optimizer2State.init_state).
    Paged variants allocate the same bytes in CUDA unified memory, which can spill to CPU RAM.
    """
    total = 0
    for t in tensors:
        if optimizer == "adamw_torch":
            per_tensor = 2 * t.numel * t.bytes_per_element
        elif optimizer == "paged_adamw_32bit" or t.numel < OPTIMIZER_8BIT_MIN_SIZE:
            per_tensor = 2 * t.numel * 4
        else:
            per_tensor = 2 * (t.numel + 4 * ceil(t.numel / OPTIMIZER_8BIT_BLOCK))
        total += per_tensor * t.count
    return total
