"""What the training objective adds to a step's memory, on top of the SFT terms (budget.py):

- dpo / orpo / simpo: TRL runs chosen and rejected of each pair as one batch, so a micro-batch of
  B pairs is 2B sequences with gradients; dpo (unless preference.precompute_ref_log_probs) also
  runs a no-grad reference forward (the base, adapter disabled) while the policy's activations are
  kept: one extra loss-head peak (logits of 2B sequences), nothing saved for backward.
- kto: each row's completion and its KL completion (another row's) are 2B sequences, plus the same
  no-grad reference forward.
- grpo: B counts completions; each sequence is prompt + completion (up to max_seq_len +
  max_completion_len tokens). Generating them holds a KV cache of 2 (K, V) x layers x kv_heads x
  head_dim x tokens x B in the compute dtype, freed before the step's forward; counted as a term
  since it can be the larger peak on short sequences. grpo.beta > 0 adds the reference forward.
- dpo (not simpo), kto and grpo: TRL patches the model's forward with its own chunked log-prob head
  (trl/kernels/chunked_logprob.py, TRL 1.x): our loss kernel is not used, its head is
  (`trl_head_bytes`; the CPU trace of one real DPO and GRPO step: scripts/estimate_objectives.py).
  orpo and simpo (TRL's experimental ORPO / CPO trainers) take the model's full logits
  (`outputs.logits`, then cross-entropy and log-softmax): the standard loss term, whatever
  train.loss_kernel says (not traced). kto's KL completions run without grad in TRL 1.16; counting
  them as sequences with gradients (2B) is conservative.
Pure arithmetic on the recipe; plan.py calls `adjust_plan`, budget.py adds `extra_terms`.
"""

from __future__ import annotations

from typing import Callable

from qlora_cli.estimate.architecture import Architecture

PAIRED = ("dpo", "orpo", "kto")
TRL_HEAD = ("dpo", "kto", "grpo")  # objectives whose TRL trainer scores tokens with its chunked log-prob head
TRL_TOKEN_CHUNK, TRL_VOCAB_CHUNK = 4096, 32768  # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE, trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE


def trl_head_bytes(arch: Architecture, plan) -> int:
    """Peak of TRL's chunked log-prob head, in its backward: one tile buffer of [min(N, 4096), 32768]
    in the compute dtype (allocated at full width even for a smaller vocabulary), the gradient of the
    hidden states in fp32 and the hidden states it scores; N = tokens of the micro-batch. On CUDA a
    Triton kernel folds each tile in place; the CPU fallback's per-tile temporaries are not counted
    (estimate/trace_trainer.py leaves them out of the trace the same way)."""
    tokens = plan.tokens
    return min(tokens, TRL_TOKEN_CHUNK) * TRL_VOCAB_CHUNK * plan.dtype_bytes + (4 + plan.dtype_bytes) * tokens * arch.hidden_size


def adjust_plan(recipe, plan):
    # plan: estimate.plan.Plan (not imported: plan.py calls this module)
    """The plan as the objective's trainer runs it: sequences per micro-batch and their length."""
    objective = recipe.train.objective
    if objective in PAIRED:
        simpo = objective == "dpo" and recipe.preference.loss_type == "simpo"
        return plan.with_changes(micro_batch=2 * plan.micro_batch, objective=objective,
                                 trl_head=objective in TRL_HEAD and not simpo,
                                 fused_loss=plan.fused_loss and objective in TRL_HEAD and not simpo,
                                 reference_forward=objective != "orpo" and recipe.preference.loss_type != "simpo"
                                 and not recipe.preference.precompute_ref_log_probs)
    if objective == "grpo":
        return plan.with_changes(seq_len=plan.seq_len + recipe.grpo.max_completion_len, objective=objective, trl_head=True,
                                 reference_forward=recipe.grpo.beta > 0)
    return plan


def kv_cache_bytes(arch: Architecture, plan) -> int:
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * plan.tokens * plan.dtype_bytes


def extra_terms(arch: Architecture, plan, loss_head_bytes: Callable) -> dict[str, int]:
    """Terms beyond SFT's, in bytes, by name (empty for sft); `loss_head_bytes(arch, plan)` is the loss
    head's peak (activations.logits_bytes, passed in: activations imports plan, which imports this module)."""
    terms = {}
    if plan.reference_forward and not plan.trl_head:
        terms["reference_forward"] = loss_head_bytes(arch, plan)
    # With TRL's head the no-grad reference forward runs after the policy's, while its activations are
    # kept, and holds one forward tile buffer: less than the policy's head in backward, which the loss term
    # already counts (the CPU trace of a DPO step peaks there).
    if plan.objective == "grpo":
        terms["generation_kv_cache"] = kv_cache_bytes(arch, plan)
    return terms
