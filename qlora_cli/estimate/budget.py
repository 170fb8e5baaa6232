"""The estimate itself: every term of a training step's peak GPU memory, summed into one breakdown.

Two device terms, from published measurements (docs/estimate-validation.md, "Device terms"):
- CUDA context: the driver context, kernels and library handles a process holds before its first
  tensor: 287 MB with lazy module loading vs 667 MB without (pytorch#86509), ~300-400 MB on CUDA 11.7+
  (pytorch#107667, #109888), 426 MiB with torch 2.10 / CUDA 13 (unsloth-zoo#1053). We count 0.5 GiB.
- Allocator overhead: PyTorch's caching allocator reserves more than it hands out. Weights and
  optimizer states are allocated once and barely fragment; what is freed and re-allocated every step
  (activations, logits, gradients) does. With fixed shapes (packed rows) the reserved peak stays
  constant (torchtune#2830) and a few % above allocated (compressed-tensors#587: 1.83 GiB on 75 GiB);
  rows of varying length fragment far more (torchtune#1185), which a note says. We count 10% of the
  per-step terms; the verdict's safety margin (advice.py) is on top. FSDP all-gathers each layer on
  its own CUDA stream, whose blocks the allocator cannot hand to the compute stream: fms-acceleration's
  published A100-80GB benchmark (scripts/benchmarks/refs/a100_80gb.csv, HF + peft + bnb, packed 4096)
  reserves 16-46% more than its peak allocation on 2 GPUs (Llama-2-70B, micro-batch 2: 50.8 GiB for
  43.5 GiB), and its micro-batch 4 ran out of memory where the allocation alone (68.6 GiB) fits; we
  count 25% of the per-step terms under FSDP.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from qlora_cli.estimate import activations, memory, methods, objectives
from qlora_cli.estimate.architecture import Architecture
from qlora_cli.estimate.plan import Plan

GIB = 1024**3
CUDA_CONTEXT_BYTES = GIB // 2
ALLOCATOR_OVERHEAD = 0.10  # of the per-step terms
ALLOCATOR_OVERHEAD_FSDP = 0.25  # of the per-step terms, with FSDP's all-gather stream (see above)


@dataclass(frozen=True)
class Estimate:
    arch: Architecture
    plan: Plan
    breakdown: dict[str, int]  # term -> bytes, in display order; sums to total
    trainable_params: int
    total_params: int
    details: dict = field(default_factory=dict)
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(self.breakdown.values())

    @property
    def pageable(self) -> int:
        """Bytes a paged optimizer keeps in CUDA unified memory, which the driver can evict to CPU."""
        return self.breakdown["optimizer_states"] if self.plan.optimizer.startswith("paged_") else 0


def _spread_over_processes(breakdown: dict, base: dict, arch: Architecture, plan: Plan, notes: list) -> None:
    """Per-GPU memory of a multi-GPU job (in place). DDP: every GPU holds the whole model, and
    DDP's gradient buckets hold a second copy of the gradients. FSDP (full shard): weights,
    adapter, gradients and optimizer states are split N ways; the GPU also holds the current
    and the prefetched decoder layer unsharded (all-gathered)."""
    n = plan.processes
    if n <= 1:
        return
    if plan.strategy != "fsdp":
        breakdown["gradients"] *= 2
        notes.append(f"DDP on {n} GPUs: per-GPU memory; each GPU holds the whole model plus DDP's gradient buckets")
        if plan.strategy == "deepspeed":
            notes.append("DeepSpeed ZeRO is not modelled: these are DDP's figures, an upper bound")
        return
    layer = (breakdown["base_weights"] - base["embeddings + lm_head"]) // max(1, arch.num_layers)
    for term in ("base_weights", "adapter_weights", "gradients", "optimizer_states"):
        breakdown[term] = -(-breakdown[term] // n)
    breakdown["base_weights"] += 2 * layer
    notes.append(f"FSDP on {n} GPUs: per-GPU memory; weights, gradients and optimizer states are sharded {n} ways, "
                 "plus two all-gathered decoder layers")


def estimate(arch: Architecture, plan: Plan) -> Estimate:
    """Peak memory of one training step of `plan` on `arch`, term by term, in bytes."""
    base = memory.base_weight_bytes(arch, plan)
    tensors = methods.trainable_tensors(arch, plan)
    act = activations.activation_parts(arch, plan)
    breakdown = {
        "base_weights": sum(base.values()),
        "adapter_weights": memory.adapter_bytes(tensors),
        "gradients": memory.gradient_bytes(tensors),
        "optimizer_states": memory.optimizer_state_bytes(tensors, plan.optimizer),
        "activations": act["total"],
        "logits_and_loss": act["loss peak"],
        **objectives.extra_terms(arch, plan, activations.logits_bytes),  # dpo / kto / grpo: reference forward, generation KV cache
    }
    notes = list(arch.notes)
    _spread_over_processes(breakdown, base, arch, plan, notes)
    per_step = breakdown["activations"] + breakdown["logits_and_loss"] + breakdown["gradients"]
    fsdp = plan.processes > 1 and plan.strategy == "fsdp"
    breakdown["allocator_overhead"] = int((ALLOCATOR_OVERHEAD_FSDP if fsdp else ALLOCATOR_OVERHEAD) * per_step)
    breakdown["cuda_context"] = CUDA_CONTEXT_BYTES
    _, _, unmatched = memory.resolve_targets(arch, plan.target_modules) if plan.method == "lora" else (None, None, [])
    if unmatched:
        notes.append(f"lora.target_modules {unmatched} match no layer; peft ignores them")
    if plan.method != "lora":
        notes.append(f"{plan.method}: activations counted for the frozen base only (the method's own are small)")
    if arch.context_length and plan.seq_len > arch.context_length:
        notes.append(f"data.max_seq_len {plan.seq_len} exceeds {arch.name}'s context of {arch.context_length} tokens "
                     "(max_position_embeddings): positions past it were never trained; lower data.max_seq_len")
    if not plan.packing:
        notes.append("unpacked rows vary in length, which fragments PyTorch's caching allocator beyond the allocator term "
                     "(torchtune #1185 measured 16.4 GiB reserved vs 10.8 GiB with it avoided); set "
                     "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, or data.packing: true")
    if arch.experts:
        notes.append("MoE activations and expert-LoRA counts are approximate")
    if plan.optimizer.startswith("paged_"):
        notes.append(f"paged optimizer: its {breakdown['optimizer_states'] / GIB:.2f} GiB of states can spill to CPU RAM under pressure (slower)")
    return Estimate(
        arch=arch,
        plan=plan,
        breakdown=breakdown,
        trainable_params=sum(t.numel * t.count for t in tensors),
        total_params=arch.total_params(),
        details={"base_weights": base, "activations": act},
        notes=tuple(notes),
    )
