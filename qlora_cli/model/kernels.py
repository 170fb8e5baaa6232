"""The loss kernel of a training run: cross-entropy over the vocabulary without the full logits.

A causal LM's standard loss materialises fp32 logits for every token of the micro-batch
(tokens x vocabulary: 4k tokens x 128k vocabulary = 2 GiB, plus as much again for their
gradient). The kernels here never do:

- `chunked` (ours, any device): `LinearCrossEntropy` walks the tokens in chunks; per chunk
  it computes the logits, the loss and at once the gradient of the hidden states (and of the
  output weight if it trains), and frees the logits. Same FLOPs as the standard path.
- `liger` (CUDA with `liger-kernel` installed): Liger's fused linear cross-entropy (Triton).
- `standard`: the model's own forward with full logits.

`auto` picks liger, then chunked, then standard, as far as the model and adapter allow.
The model runs its forward as usual (through any DDP/FSDP wrapper) but projects no position
onto the vocabulary (`logits_to_keep` = no position) and hands back its final hidden states.
"""

from __future__ import annotations

import importlib.util
import inspect
from dataclasses import dataclass
from typing import Optional

import torch

from qlora_cli.data.formats import IGNORE_INDEX
from qlora_cli.errors import ConfigError

CHUNK_LOGIT_BYTES = 256 * 2**20  # fp32 logits held at once by the chunked kernel


def chunk_tokens(vocab_size: int) -> int:
    """Tokens per chunk so that one chunk's fp32 logits stay within CHUNK_LOGIT_BYTES."""
    return max(64, CHUNK_LOGIT_BYTES // (4 * vocab_size))


def _chunked_cross_entropy(hidden, weight, labels, chunk: int, want_hidden: bool, want_weight: bool, softcap: Optional[float] = None):
    """(summed loss, d loss/d hidden, d loss/d weight), one chunk of logits alive at a time.

    `softcap` (Gemma 2): the logits are cap * tanh(z / cap) of the projection z, as the model's own
    forward computes them; the gradient through it is scaled by 1 - tanh(z / cap)^2.
    """
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros_like(weight, dtype=torch.float32) if want_weight else None
    for start in range(0, hidden.shape[0], chunk):
        h, y = hidden[start:start + chunk], labels[start:start + chunk]
        valid = y != IGNORE_INDEX
        target = y.clamp(min=0).unsqueeze(1)
        logits = (h @ weight.t()).float()
        slope = None
        if softcap:
            capped = torch.tanh(logits / softcap)
            slope = 1 - capped.square() if (want_hidden or want_weight) else None
            logits = capped.mul_(softcap)
        lse = torch.logsumexp(logits, dim=1)
        total += ((lse - logits.gather(1, target).squeeze(1)) * valid).sum()
        if want_hidden or want_weight:
            grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
            grad.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=grad.dtype, device=grad.device))
            grad.mul_(valid.unsqueeze(1))
            if slope is not None:
                grad.mul_(slope)
            if want_hidden:
                grad_hidden[start:start + chunk] = (grad.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_weight:
                grad_weight += grad.t() @ h.float()
        del logits, slope
    return total, grad_hidden, grad_weight


class LinearCrossEntropy(torch.autograd.Function):
    """sum over non-ignored tokens of CE(hidden @ weight.T, labels), computed chunk by chunk.

    The gradients are computed during the forward, so no [tokens, vocab] tensor outlives its
    chunk; backward only scales them by the incoming gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, softcap: Optional[float] = None) -> torch.Tensor:
        ctx.wants = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.dtypes = hidden.dtype, weight.dtype
        total, grad_hidden, grad_weight = _chunked_cross_entropy(hidden, weight, labels, chunk, *ctx.wants, softcap)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_output.to(ctx.dtypes[0])
        if grad_weight is not None:
            grad_weight = (grad_weight * grad_output).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, None, None, None


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: Optional[int] = None, softcap: Optional[float] = None
) -> torch.Tensor:
    """Summed token cross-entropy of `hidden @ weight.T` (soft-capped when `softcap`) against
    `labels` ([N, H], [V, H], [N])."""
    chunk = chunk or chunk_tokens(weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(hidden, weight, labels, chunk, softcap)
    with torch.no_grad():
        return _chunked_cross_entropy(hidden, weight, labels, chunk, False, False, softcap)[0]


@dataclass(frozen=True)
class LossKernel:
    """What computes the training loss, and why (printed at start-up)."""

    name: str  # "liger" | "chunked" | "standard"
    reason: str

    @property
    def fused(self) -> bool:
        return self.name != "standard"


def _causal_lm(model):
    """The transformers CausalLM inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def unsupported_reason(model) -> Optional[str]:
    """Why the loss cannot be fused for this model (None when it can)."""
    if getattr(model, "peft_config", None) and any(getattr(c, "is_prompt_learning", False) for c in model.peft_config.values()):
        return "prompt-learning adapters change the forward"
    lm = _causal_lm(model)
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not torch.nn.Linear or head.bias is not None:
        return "the output layer is not a plain bias-free Linear (adapter or modules_to_save on lm_head?)"
    config = lm.config
    if getattr(config, "logit_scale", None) or getattr(config, "logits_scaling", None):
        return "the model scales its logits"
    if "logits_to_keep" not in inspect.signature(lm.forward).parameters:
        return "the model's forward has no logits_to_keep"
    return None


def select_loss_kernel(requested: str, model) -> LossKernel:
    """Resolve `train.loss_kernel` for this model on this machine."""
    if requested == "standard":
        return LossKernel("standard", "requested")
    reason = unsupported_reason(model)
    if reason:
        if requested != "auto":
            raise ConfigError(f"train.loss_kernel={requested} cannot be used: {reason}; set train.loss_kernel=standard")
        return LossKernel("standard", reason)
    liger = torch.cuda.is_available() and importlib.util.find_spec("liger_kernel") is not None
    if requested == "liger" and not liger:
        raise ConfigError("train.loss_kernel=liger needs a CUDA GPU and `pip install liger-kernel`; or set train.loss_kernel=auto")
    if requested == "liger" or (requested == "auto" and liger):
        return LossKernel("liger", "Liger fused linear cross-entropy (CUDA)")
    config = _causal_lm(model).config
    capped = f", logits soft-capped at {softcap_of(model):g}" if softcap_of(model) else ""
    return LossKernel("chunked", f"chunked linear cross-entropy, {chunk_tokens(config.get_text_config().vocab_size)} tokens a chunk{capped}")


def softcap_of(model) -> Optional[float]:
    """The final-logit soft-capping the model's own forward applies (Gemma 2), or None."""
    return getattr(_causal_lm(_unwrap(model)).config.get_text_config(), "final_logit_softcapping", None) or None


def fused_causal_lm_loss(model, inputs: dict, kernel: LossKernel, num_items_in_batch=None) -> torch.Tensor:
    """The causal-LM loss of `inputs` (with labels) as transformers computes it, without full logits.

    Labels are shifted as transformers' ForCausalLMLoss does; the sum is divided by
    num_items_in_batch when the Trainer gives it (token-exact gradient accumulation), else by
    the count of scored tokens.
    """
    inputs = dict(inputs)
    labels = inputs.pop("labels")
    hidden_all = model(**inputs, output_hidden_states=-1, logits_to_keep=torch.zeros(0, dtype=torch.long, device=labels.device))
    hidden = hidden_all.hidden_states[-1]
    shifted = torch.nn.functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]
    hidden = hidden.reshape(-1, hidden.shape[-1])
    shifted = shifted.reshape(-1).to(hidden.device)
    weight = _causal_lm(_unwrap(model)).get_output_embeddings().weight
    if kernel.name == "liger":
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        total = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", softcap=softcap_of(model))(weight, hidden, shifted)
    else:
        total = linear_cross_entropy_sum(hidden, weight, shifted, softcap=softcap_of(model))
    denominator = num_items_in_batch if num_items_in_batch is not None else (shifted != IGNORE_INDEX).sum().clamp(min=1)
    if torch.is_tensor(denominator):
        denominator = denominator.to(total.device)
    return total / denominator


def causal_lm_loss(model, inputs: dict, kernel: LossKernel) -> torch.Tensor:
    """The training loss of one batch as `qlora train` computes it: the selected kernel, or the model's own loss."""
    if kernel.fused and "labels" in inputs:
        return fused_causal_lm_loss(model, inputs, kernel)
    return model(**inputs).loss


def _unwrap(model):
    """The module inside DDP / FSDP / compile wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)
