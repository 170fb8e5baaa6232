"""Memory that grows with tokens: tensors autograd saves for backward, the transient working set of
one layer's backward, and the logits / loss. Pure arithmetic; T = micro_batch x seq_len tokens,
a = bytes of the compute dtype (2 for bf16/fp16).

Derivation for one Llama-style decoder layer under LoRA with a frozen base (mixed precision as the
HF Trainer runs it: bf16 weights, fp32 adapters, autocast). A frozen matmul saves no input (its
weight gets no gradient), so what autograd keeps is:
  RMSNorm (HF upcasts to fp32 first)        4*T*h + 4*T per norm (2 per layer; Gemma 2/3: 4)
      (the first layer's input norm, and the dropout masks of the LoRA layers that read it, save
      nothing: no tensor before them needs a gradient)
  q/k RMSNorm (Qwen3, Gemma 3)               4*T*(q_dim + kv_dim)
  each LoRA-wrapped Linear(in, out)          T*in*(a + 1 if dropout) + T*r*a + a*r*(in + out)
      peft casts x to the fp32 adapter dtype, dropout keeps a 1-byte mask, autocast saves a bf16
      copy of x for lora_A, lora_B keeps lora_A's output (T x r), and autocast's bf16 copies of
      the fp32 A and B weights are saved too
  attention (sdpa / flash)                   a*T*(q_dim + 2*kv_w) + a*T*q_dim (out) + 4*T*heads (lse)
      kv_w = q_dim when transformers repeats k/v heads (sdpa with a mask, i.e. micro-batch > 1; eager)
      sdpa with a mask also keeps the additive float mask it builds from the boolean one: a*S2
  attention (eager) instead                  a*T*3*q_dim + (4 + a)*heads*S2 (fp32 softmax + bf16 copy)
      S2 = T^2 with packing (one row of T tokens), micro_batch*seq^2 without
  SwiGLU / GeGLU MLP                         3*a*T*i (act input, act output, up)
  8-bit base (bnb MatMul8bitLt keeps its input) a*T*(unique inputs of the quantized linears)
      (so did 4-bit MatMul4Bit in older bitsandbytes: Plan.bnb_keeps_input, for published runs)
No checkpointing keeps every layer's set. Non-reentrant checkpointing (HF, per decoder layer) keeps
only each layer's input (a*T*h) and rebuilds one layer's set at a time during backward.
"""

from __future__ import annotations

from qlora_cli.estimate import objectives
from qlora_cli.estimate.architecture import Architecture
from qlora_cli.estimate.memory import resolve_targets
from qlora_cli.estimate.plan import Plan

LOSS_BYTES_PER_LOGIT = 12  # fp32 log_softmax output (saved) + its gradient + the gradient of its input


def _mask_present(plan: Plan) -> bool:
    """transformers builds an attention mask when rows share a micro-batch (padding or packed rows)
    or when prefix tuning hands its keys/values in as a cache (prefix + causal); a single row
    otherwise runs causal attention with no mask (is_causal)."""
    return plan.micro_batch > 1 or plan.method == "prefix_tuning"


def _scores_area(plan: Plan) -> int:
    """Entries of one head's attention matrix summed over the micro-batch (keys include a prefix)."""
    if plan.packing:
        return plan.tokens**2
    keys = plan.seq_len + (plan.num_virtual_tokens if plan.method == "prefix_tuning" else 0)
    return plan.micro_batch * plan.seq_len * keys


def _lora_inputs(arch: Architecture, plan: Plan) -> tuple[list[tuple[int, int]], bool]:
    """(in, out) of the LoRA-wrapped decoder linears, and whether the MoE experts are adapted."""
    if plan.method != "lora":
        return [], False
    linears, others, _ = resolve_targets(arch, plan.target_modules)
    return [(l.in_features, l.out_features) for l in linears], "experts" in others


def attention_saved_bytes(arch: Architecture, plan: Plan) -> int:
    a, T = plan.dtype_bytes, plan.tokens
    if plan.attention == "eager":  # fp32 softmax output + its compute-dtype copy (+ Gemma 2's tanh soft-cap output)
        softcap = a if arch.model_type == "gemma2" else 0
        return a * T * 3 * arch.q_dim + (4 + a + softcap) * arch.num_heads * _scores_area(plan)
    masked = plan.attention == "sdpa" and _mask_present(plan)
    kv_width = arch.q_dim if masked else arch.kv_dim
    float_mask = a * _scores_area(plan) if masked else 0
    return a * T * (2 * arch.q_dim + 2 * kv_width) + 4 * T * arch.num_heads + float_mask


def layer_saved_bytes(arch: Architecture, plan: Plan) -> int:
    """Bytes autograd keeps for one decoder layer (see the module docstring)."""
    a, T, h, i = plan.dtype_bytes, plan.tokens, arch.hidden_size, arch.intermediate_size
    total = arch.norms_per_layer * 4 * T * (h + 1)
    if arch.qk_norm:
        total += 4 * T * (arch.q_dim + arch.kv_dim)
    lora, experts_adapted = _lora_inputs(arch, plan)
    mask_byte = 1 if plan.lora_dropout > 0 else 0
    for in_features, out_features in lora:
        total += T * in_features * (a + mask_byte) + T * plan.lora_r * a + a * plan.lora_r * (in_features + out_features)
        if plan.use_dora:  # DoRA scales the base and LoRA outputs (compute dtype) by its fp32 magnitude: both kept for its gradient
            total += 2 * a * T * out_features
    total += attention_saved_bytes(arch, plan)
    if arch.experts:  # top-k experts per token, each a SwiGLU on its tokens, plus the routing
        top_k = arch.experts_per_token
        total += top_k * (3 * a * T * i + a * T * h)
        # fp32 router softmax (T x experts) and, per routed token, its int64 indices (as routed, sorted
        # and gathered), fp32 weight and its broadcast: ~40 bytes (the trace of tiny Mixtral: 100 B/token)
        total += 4 * T * arch.router_experts + 40 * T * top_k
        if arch.shared_expert_size:  # Qwen2-MoE: a dense SwiGLU beside the experts, scaled by sigmoid(gate(x))
            total += 3 * a * T * arch.shared_expert_size + a * T * h + a * T
        if experts_adapted:
            total += top_k * a * T * (h + i)
    else:
        total += 3 * a * T * i
    if plan.bits == 8 or (plan.bits == 4 and plan.bnb_keeps_input):
        inputs = h + arch.q_dim + (0 if arch.experts else h + i)
        total += a * T * inputs
    return total


def shared_saved_bytes(arch: Architecture, plan: Plan) -> int:
    """Saved once per step, not per layer: the final norm, rotary cos/sin, the labels, the attention
    mask, and the head's input when the head trains; less the first layer's input norm, which saves
    nothing while the embeddings are frozen."""
    a, T = plan.dtype_bytes, plan.tokens
    total = 4 * T * (arch.hidden_size + 1) + 2 * a * T * arch.head_dim + 8 * T
    if "embed_tokens" not in plan.modules_to_save and not plan.gradient_checkpointing:
        # (with checkpointing no layer's set is kept, so there is nothing of the first one to take off)
        total -= 4 * T * (arch.hidden_size + 1)
        if plan.lora_dropout > 0 and plan.method == "lora":
            linears, _, _ = resolve_targets(arch, plan.target_modules)
            total -= T * sum(l.in_features for l in linears if l.role == "attn_in")
    if plan.gradient_checkpointing:
        total += attention_mask_bytes(plan)  # an input of every checkpointed layer: kept for the recompute
    head_trains = "lm_head" in plan.modules_to_save or (
        plan.target_modules != "all-linear" and any(k.rpartition(".")[2] == "lm_head" for k in plan.target_modules)
    )
    if head_trains:
        total += a * T * arch.hidden_size
    return total


def residual_bytes(plan: Plan) -> int:
    """Bytes per element of the residual stream: the compute dtype, or fp32 when something upcasts it
    (fp32 + bf16 stays fp32): embeddings left in fp32 (peft's prepare_model_for_kbit_training in other
    stacks), or IA3 on a quantized base: peft scales down_proj's input by its fp32 vector, and
    bitsandbytes' Linear4bit/8bitLt return their input's dtype, so the MLP output added to the
    residual is fp32 (the CPU trace shows it; nn.Linear under autocast would return bf16)."""
    if plan.bits in (4, 8) and (plan.upcast_frozen or plan.method == "ia3"):
        return 4
    return plan.dtype_bytes


def attention_mask_bytes(plan: Plan) -> int:
    """The mask transformers builds once per forward (bool for sdpa, additive in the compute dtype for
    eager). No layer saves it (sdpa saves its own float copy, counted per layer), so without
    checkpointing it lives through the forward only; with checkpointing the layers keep it."""
    if not _mask_present(plan) or plan.attention == "flash_attention_2":
        return 0
    return (plan.dtype_bytes if plan.attention == "eager" else 1) * _scores_area(plan)


def largest_dequantized_weight(arch: Architecture, plan: Plan) -> int:
    """bitsandbytes dequantizes one weight at a time to the compute dtype for the matmul (forward and
    backward); the largest one is the transient."""
    if plan.bits == 16:
        return 0
    return max(l.in_features * l.out_features for l in arch.linears) * plan.dtype_bytes


def lora_input_gradient_bytes(arch: Architecture, plan: Plan) -> int:
    """The gradient of a LoRA layer's input on its way back through peft's casts, for the widest
    adapted input (down_proj's, the MLP width): lora_A's bf16 input gradient becomes fp32 (autocast's
    copy of the fp32 input), dropout's backward multiplies it by the mask into a second fp32 tensor,
    which then goes back to the compute dtype: 4 + 4 bytes per element alive at once with dropout,
    4 + a without (the CPU trace of the padded micro-batch-4 row shows both fp32 T x i tensors)."""
    if plan.method != "lora":
        return 0
    linears, _, _ = resolve_targets(arch, plan.target_modules)
    widest = max((l.in_features for l in linears), default=0)
    per_element = 8 if plan.lora_dropout > 0 else 4 + plan.dtype_bytes
    return per_element * plan.tokens * widest


def backward_working_bytes(arch: Architecture, plan: Plan) -> int:
    """Gradients in flight while one layer runs backward: the residual-stream gradient and the branch
    gradient (2*a*T*h), then the larger of two moments: the MLP's (two MLP-width gradients, 2*a*T*i,
    beside the LoRA branch's fp32 gradient of down_proj's input, lora_input_gradient_bytes) or, for
    eager attention, the attention scores' (the softmax's output gradient upcast to fp32 and its
    input gradient, less the freed copy); plus the dequantized weight and DoRA's transients."""
    a, T = plan.dtype_bytes, plan.tokens
    mlp = 2 * a * T * arch.intermediate_size + lora_input_gradient_bytes(arch, plan)
    scores = (8 - a) * arch.num_heads * _scores_area(plan) if plan.attention == "eager" else 0
    working = 2 * residual_bytes(plan) * T * arch.hidden_size + max(mlp, scores)
    return working + largest_dequantized_weight(arch, plan) + dora_weight_bytes(arch, plan)


def dora_weight_bytes(arch: Architecture, plan: Plan) -> int:
    """DoRA's weight norm (peft lora/dora.py) builds full-size weights in the fp32 adapter dtype for
    each adapted layer in turn: B @ A (via an in x in identity), the dequantized base cast to fp32,
    and their scaled sum: 3 fp32 weights plus the identity, for the largest adapted linear."""
    if not plan.use_dora or plan.method != "lora":
        return 0
    linears, _, _ = resolve_targets(arch, plan.target_modules)
    weights = max((4 * (3 * l.in_features * l.out_features + l.in_features**2) for l in linears), default=0)
    # backward through its fp32 result (magnitude x (base + scaled LoRA)): the fp32 gradient of the
    # result and one product at a time, for the widest output
    gradients = 2 * 4 * plan.tokens * max((l.out_features for l in linears), default=0)
    return weights + gradients


CHUNK_LOGIT_BYTES = 256 * 2**20  # = qlora_cli.kernels.CHUNK_LOGIT_BYTES (that module imports torch)
UNFUSABLE = {"cohere", "cohere2"}  # scaled logits (kernels.unsupported_reason): the standard loss
SOFT_CAPPED = {"gemma2"}  # final_logit_softcapping: the chunked kernel caps each chunk (kernels._chunked_cross_entropy)


def fused_loss_bytes(arch: Architecture, plan: Plan) -> int:
    """Peak of the chunked linear cross-entropy (kernels.LinearCrossEntropy): one chunk's fp32
    logits, turned into their gradient in place, plus its copy in the compute dtype, the final
    hidden states it reads and the gradient it hands to backward (2*a*T*h). Soft-capping (Gemma 2)
    holds four fp32 chunks at once instead: the logits, tanh(logits / cap), its square and the slope
    1 - tanh^2 kept for the gradient."""
    chunk = min(plan.tokens, max(64, CHUNK_LOGIT_BYTES // (4 * arch.vocab_size)))
    per_logit = 16 if arch.model_type in SOFT_CAPPED else 4 + plan.dtype_bytes
    return chunk * arch.vocab_size * per_logit + 2 * residual_bytes(plan) * plan.tokens * arch.hidden_size


def logits_bytes(arch: Architecture, plan: Plan) -> int:
    """Peak of the head and the loss. transformers' ForCausalLMLoss upcasts the logits to fp32 and
    cross_entropy keeps the fp32 log_softmax; at the start of backward that output, its gradient and
    the gradient of its input coexist: 12 bytes per logit (the bf16 logits and the fp32 copy of the
    forward, a + 4 + 4, are fewer). Gemma 2's logit soft-capping keeps one more a-byte copy."""
    if plan.trl_head:
        return objectives.trl_head_bytes(arch, plan)
    if plan.fused_loss and arch.model_type not in UNFUSABLE:
        return fused_loss_bytes(arch, plan)
    per_logit = (plan.loss_bytes_per_logit or LOSS_BYTES_PER_LOGIT) + (plan.dtype_bytes if arch.model_type == "gemma2" else 0)
    return per_logit * plan.tokens * arch.vocab_size


def activation_parts(arch: Architecture, plan: Plan) -> dict[str, int]:
    """Token-dependent memory at the step's peak.

    persistent: what stays saved until backward reaches it (all layers' sets, or with checkpointing
    the layer inputs), plus the shared tensors. The peak then adds the larger of two moments that do
    not overlap: the loss at the start of backward (logits) or one layer's backward (its recomputed
    set when checkpointing, plus the working set). The layer part is reported beyond the logits only.
    """
    T = plan.tokens
    per_layer = layer_saved_bytes(arch, plan)
    working = backward_working_bytes(arch, plan)
    if plan.gradient_checkpointing:
        persistent = arch.num_layers * residual_bytes(plan) * T * arch.hidden_size
        layer_peak = per_layer + working
    else:
        persistent = arch.num_layers * per_layer
        layer_peak = working
    persistent += shared_saved_bytes(arch, plan)
    logits = logits_bytes(arch, plan)
    forward_mask = 0 if plan.gradient_checkpointing else attention_mask_bytes(plan)  # the forward's own peak
    final_norm = 4 * T * (arch.hidden_size + 1)  # kept for the loss moment, freed before any layer's backward
    return {
        "kept until backward": persistent,
        "one layer's backward": layer_peak,
        "loss peak": logits,
        "one layer saved": per_layer,
        "total": persistent + max(0, layer_peak - final_norm - logits, forward_mask - logits),
    }
