"""The trace of one step of the objective's own Trainer: for DPO / KTO / ORPO / GRPO the step is TRL's
(chosen and rejected in one batch and the reference forward with the adapter disabled; GRPO's
generation of its completions with a KV cache, then the policy and reference forwards and the loss),
so it is traced through `train/run.setup` + `build_trainer` and `Trainer.train` itself, not
step.py's SFT loss. The run directory is a scratch folder; step 1 creates the optimizer states,
step 2 is traced (from the callback's step begin to its step end: data, generation, forward,
backward, optimizer step, zero_grad). Terms: weights, adapter, gradients, optimizer states as
trace.py charges them; everything else made during the step is `activations` (the estimate's
activations, loss, reference forward and KV cache together).
"""

from __future__ import annotations

import gc
import tempfile
from pathlib import Path

from transformers import TrainerCallback
from trl.kernels import chunked_logprob

from qlora_cli.estimate.step import StepParts
from qlora_cli.estimate.trace import CPU_ONLY, TERMS, LiveBytes, Trace, resident_tensors
from qlora_cli.recipe.schema import Recipe
from qlora_cli.train import distributed
from qlora_cli.train.run import build_trainer, setup


class _TraceSecondStep(TrainerCallback):
    """Enters the counter at the second step's beginning and leaves it at its end."""

    def __init__(self) -> None:
        self.counter = LiveBytes()
        self.trainer = None
        self.handles: list = []
        self.active = False

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step != 1 or self.active:
            return
        model, optimizer = self.trainer.model, getattr(self.trainer.optimizer, "optimizer", self.trainer.optimizer)  # accelerate wraps it
        gc.collect()
        parts = StepParts(model, None, optimizer, None, 0)
        for tensor, term in resident_tensors(parts):
            self.counter.add(tensor, term)
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.handles = [p.register_post_accumulate_grad_hook(lambda p: self.counter.retag(p.grad, "gradients")) for p in trainable]
        self.handles.append(optimizer.register_step_pre_hook(lambda *a: setattr(self.counter, "phase", "optimizer_step")))
        self.counter.phase = "activations"
        self.counter.__enter__()
        self.active = True

    def on_step_end(self, args, state, control, **kwargs):
        if not self.active:
            return
        self.counter.__exit__(None, None, None)
        self.active = False
        for handle in self.handles:
            handle.remove()
        control.should_training_stop = True


def _uncounted(function, counter: LiveBytes):
    """`function` with whatever it allocates left out of the count (a CPU-only fallback)."""

    def run(*args, **kwargs):
        phase, counter.phase = counter.phase, CPU_ONLY
        try:
            return function(*args, **kwargs)
        finally:
            counter.phase = phase

    return run


def trace_trainer_step(recipe: Recipe) -> Trace:
    """Peak live bytes of the second step `qlora train` takes for `recipe` (any objective)."""
    with tempfile.TemporaryDirectory(prefix="qlora-trace-") as scratch:
        recipe = recipe.model_copy(update={
            "output": recipe.output.model_copy(update={"dir": str(Path(scratch) / "run")}),
            "train": recipe.train.model_copy(update={"max_steps": 2, "save_steps": 1000, "eval_steps": None,
                                                     "gradient_accumulation_steps": 1, "report_to": ["none"]}),
        })
        here = distributed.world()
        ready = setup(recipe, None, [], False, here)
        tracer = _TraceSecondStep()
        trainer = build_trainer(ready, False, (tracer,), here)[0]
        tracer.trainer = trainer
        counter = tracer.counter
        tiles = {name: getattr(chunked_logprob, name) for name in ("_forward_tile", "_backward_tile")}
        try:  # the module looks these up at each call: patched for the trace only
            for name, function in tiles.items():
                setattr(chunked_logprob, name, _uncounted(function, counter))
            trainer.train()
        finally:
            for name, function in tiles.items():
                setattr(chunked_logprob, name, function)
    if not counter.peak:
        raise RuntimeError("the traced step never ran (fewer than 2 steps of data?)")
    at_peak = {term: counter.at_peak.get(term, 0) for term in TERMS}
    notes = [f"{counter.masks} dropout masks counted at 1 byte per element, as CUDA keeps them"] if counter.masks else []
    # Unlike step.py's worst-case batch, the objective's trainer reads the recipe's data (pairs, prompts, generations).
    notes.append("traced on the recipe's own rows: rows shorter than data.max_seq_len (or completions shorter than "
                 "max_completion_len) use less than the estimate's worst case")
    return Trace(counter.peak, at_peak, counter.phase_at_peak, counter.ops, str(ready.dtype).removeprefix("torch."),
                 next(trainer.model.parameters()).device.type, notes, counter.largest_at_peak)
