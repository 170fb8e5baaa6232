"""`qlora estimate --trace`: the ground truth the arithmetic is checked against, on any device.

One real training step (step.py: the model `train` builds, its loss, backward, optimizer step) runs
under a TorchDispatchMode that sees every tensor an aten op creates; bytes are counted per
*storage* (views and in-place results share their storage and count once), added when a storage
first appears and subtracted when it is freed (a C++ weak reference tells). The peak of the live
bytes is split into the estimator's terms by when each storage was made. No allocator is involved,
so on CPU it measures what a CUDA run allocates, apart from the differences below, which the trace
models as CUDA does them:

- dropout: CPU draws its mask with bernoulli_ into a tensor of the input's dtype (fp32 under peft's
  fp32 adapters: 4 B/element); CUDA's fused native_dropout keeps a bool mask (1 B). Counted at 1 B.
- bitsandbytes 4-bit: the CPU and CUDA paths both dequantize one weight to the compute dtype per
  matmul and free it (MatMul4Bit); the same transient is seen here. Its CUDA-only workspaces
  (cuBLAS, the paged optimizer's unified memory bookkeeping) are device terms, not traced.
- attention: CPU sdpa runs its flash-for-CPU kernel or the math path; the trace reports what ran.

A warm-up step runs first so that the optimizer states exist (the Trainer's steady state: step 2 on).
"""

from __future__ import annotations

import gc
import heapq
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from qlora_cli.estimate.step import StepParts, build_step_parts, random_batch, train_step
from qlora_cli.recipe.schema import Recipe

# Trace terms, in the order the estimate prints its own (budget.py).
CPU_ONLY = "cpu_only"  # the phase of work whose temporaries exist on CPU only: not counted
TERMS = ("base_weights", "adapter_weights", "gradients", "optimizer_states", "activations", "backward_working",
         "logits_and_loss", "optimizer_step")


@dataclass
class Trace:
    """Peak live bytes of one step and its split; `ops` aten calls were seen, `notes` say what ran."""

    peak: int
    at_peak: dict[str, int]
    phase_at_peak: str
    ops: int
    dtype: str
    device: str
    notes: list[str] = field(default_factory=list)
    largest: list[tuple[int, str, str]] = field(default_factory=list)  # (bytes, term, aten op) at the peak

    def as_estimate_terms(self) -> dict[str, int]:
        """The split in the estimate's own terms: the backward's working set belongs to activations."""
        terms = dict(self.at_peak)
        terms["activations"] = terms.pop("activations") + terms.pop("backward_working")
        terms["optimizer_states"] += terms.pop("optimizer_step")
        return terms


class LiveBytes(TorchDispatchMode):
    """Counts live storage bytes by term. `phase` names the term new storages are charged to."""

    def __init__(self) -> None:
        super().__init__()
        self.storages: dict[int, tuple[object, int, str]] = {}  # StorageImpl address -> (weak ref, bytes, term)
        self.made_by: dict[int, str] = {}  # StorageImpl address -> the aten op that made it
        self.largest_at_peak: list[tuple[int, str, str]] = []  # (bytes, term, op) of the largest storages at the peak
        self.by_term: dict[str, int] = defaultdict(int)
        self.live = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.phase_at_peak = ""
        self.phase = "activations"
        self.ops = 0
        self.masks = 0

    def add(self, tensor: torch.Tensor, term: str, bytes_: int | None = None, op: str = "resident") -> None:
        if term == CPU_ONLY:
            return  # made by a CPU fallback of what CUDA computes in place (trace_trainer.py)
        storage = tensor.untyped_storage()
        key = storage._cdata
        known = self.storages.get(key)
        if known is not None and not known[0].expired():
            return  # a view or an in-place result of a storage already counted
        if known is not None:
            self._drop(key)
        size = storage.nbytes() if bytes_ is None else bytes_
        if size == 0:
            return
        self.storages[key] = (StorageWeakRef(storage), size, term)
        self.made_by[key] = op
        self.by_term[term] += size
        self.live += size

    def retag(self, tensor: torch.Tensor, term: str, bytes_: int | None = None) -> None:
        """Charge an existing storage to another term (a gradient is made by backward, kept as .grad)."""
        key = tensor.untyped_storage()._cdata
        known = self.storages.get(key)
        if known is None:
            self.add(tensor, term, bytes_)
            return
        weak, size, old = known
        new_size = size if bytes_ is None else bytes_
        self.by_term[old] -= size
        self.by_term[term] += new_size
        self.live += new_size - size
        self.storages[key] = (weak, new_size, term)

    def _drop(self, key: int) -> None:
        _, size, term = self.storages.pop(key)
        self.made_by.pop(key, None)
        self.by_term[term] -= size
        self.live -= size

    def sweep(self) -> None:
        for key in [key for key, (weak, _, _) in self.storages.items() if weak.expired()]:
            self._drop(key)

    def _check_peak(self) -> None:
        if self.live <= self.peak:
            return
        self.sweep()  # frees are only seen here: settle them before calling this a peak
        if self.live > self.peak:
            self.peak = self.live
            self.at_peak = dict(self.by_term)
            self.phase_at_peak = self.phase
            self.largest_at_peak = heapq.nlargest(8, ((size, term, self.made_by.get(key, "?")) for key, (_, size, term) in self.storages.items()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        if func is torch.ops.aten.bernoulli_.float:
            # CPU dropout draws its mask in the input's dtype; CUDA's native_dropout keeps a bool mask.
            self.retag(out, self.phase, out.numel())
            self.masks += 1
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self.add(tensor, self.phase, op=func.__name__)
        self._check_peak()
        return out


def resident_tensors(parts: StepParts):
    """(tensor, term) for everything alive before the step: weights, quantization constants,
    buffers, the adapter, the optimizer states."""
    model = parts.model
    for param in model.parameters():
        yield param, "adapter_weights" if param.requires_grad else "base_weights"
        quant_state = getattr(param, "quant_state", None)
        while quant_state is not None:  # bitsandbytes 4-bit: absmax, code, offset, nested state2
            for name in ("absmax", "code", "offset"):
                value = getattr(quant_state, name, None)
                if isinstance(value, torch.Tensor):
                    yield value, "base_weights"
            quant_state = getattr(quant_state, "state2", None)
        scale = getattr(param, "SCB", None)  # bitsandbytes 8-bit row scales
        if isinstance(scale, torch.Tensor):
            yield scale, "base_weights"
    for buffer in model.buffers():
        yield buffer, "base_weights"
    for state in parts.optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value, "optimizer_states"


def _loss_phase_hooks(model, counter: LiveBytes) -> list:
    """The loss term runs from the output head's forward to the gradient reaching the final norm."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head, final_norm = lm.get_output_embeddings(), lm.get_decoder().norm

    def enter_loss(module, args):
        counter.phase = "logits_and_loss"

    def on_norm_output(module, args, output):
        if output.requires_grad:
            output.register_hook(lambda grad: setattr(counter, "phase", "backward_working"))

    return [head.register_forward_pre_hook(enter_loss), final_norm.register_forward_hook(on_norm_output)]


def trace_step(recipe: Recipe, parts: StepParts | None = None) -> Trace:
    """Peak live bytes of one steady-state training step of `recipe` (after a warm-up step)."""
    parts = parts or build_step_parts(recipe)
    generator = torch.Generator().manual_seed(recipe.train.seed)
    train_step(parts, random_batch(recipe, parts.vocab_size, generator))  # creates the optimizer states
    batch = random_batch(recipe, parts.vocab_size, generator)
    gc.collect()
    counter = LiveBytes()
    for tensor, term in resident_tensors(parts):
        counter.add(tensor, term)
    handles = _loss_phase_hooks(parts.model, counter)
    trainable = [p for p in parts.model.parameters() if p.requires_grad]
    handles += [p.register_post_accumulate_grad_hook(lambda p: counter.retag(p.grad, "gradients")) for p in trainable]

    def phase(name: str) -> None:
        counter.phase = "logits_and_loss" if name == "backward" else "optimizer_step"

    try:
        with counter:
            train_step(parts, batch, hooks=phase)
    finally:
        for handle in handles:
            handle.remove()
    notes = [f"{counter.masks} dropout masks counted at 1 byte per element, as CUDA keeps them"] if counter.masks else []
    at_peak = {term: counter.at_peak.get(term, 0) for term in TERMS}
    device = next(parts.model.parameters()).device.type
    return Trace(counter.peak, at_peak, counter.phase_at_peak, counter.ops, str(parts.dtype).removeprefix("torch."), device, notes,
                 counter.largest_at_peak)
