"""`qlora train --auto-fit`: the micro-batch, gradient accumulation and checkpointing that fit the
GPU's free memory with the safety margin, keeping the recipe's effective batch (micro-batch x
accumulation x processes). Pure arithmetic on the estimate; the caller measures the free memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from qlora_cli.errors import ResourceError
from qlora_cli.estimate.advice import FITS, safety_margin, state_of
from qlora_cli.estimate.architecture import resolve
from qlora_cli.estimate.budget import GIB, estimate
from qlora_cli.estimate.plan import plan_from_recipe
from qlora_cli.recipe.schema import Recipe


@dataclass(frozen=True)
class FitChoice:
    micro_batch: int
    accumulation: int
    gradient_checkpointing: bool
    total: int  # estimated peak bytes of the choice
    capacity: int

    def overrides(self) -> list[str]:
        """The choice as --set overrides (recorded in the run's recipe.yaml, so --resume agrees)."""
        return [f"train.micro_batch_size={self.micro_batch}", f"train.gradient_accumulation_steps={self.accumulation}",
                f"train.gradient_checkpointing={str(self.gradient_checkpointing).lower()}"]

    def describe(self) -> str:
        return (f"micro-batch {self.micro_batch} x accumulation {self.accumulation}, gradient checkpointing "
                f"{'on' if self.gradient_checkpointing else 'off'}: estimated {self.total / GIB:.2f} GiB of "
                f"{self.capacity / GIB:.2f} GiB free (safety margin {safety_margin(self.total) / GIB:.2f} GiB)")


def divisors_descending(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


def auto_fit(recipe: Recipe, capacity: int, processes: int = 1) -> FitChoice:
    """The largest micro-batch dividing the per-process batch that fits `capacity` bytes with the
    safety margin, under the recipe's checkpointing setting, else with checkpointing turned on.
    Nothing fits: a one-line ResourceError with the smallest run's estimate."""
    arch = resolve(recipe.model.path)
    plan = plan_from_recipe(recipe, processes=processes)
    per_process = recipe.train.micro_batch_size * recipe.train.gradient_accumulation_steps
    checkpointing = [plan.gradient_checkpointing] + ([True] if not plan.gradient_checkpointing else [])
    for gradient_checkpointing in checkpointing:
        for micro in divisors_descending(per_process):
            total = estimate(arch, plan.with_changes(micro_batch=micro, gradient_checkpointing=gradient_checkpointing)).total
            if state_of(total, capacity) == FITS:
                return FitChoice(micro, per_process // micro, gradient_checkpointing, total, capacity)
    smallest = estimate(arch, plan.with_changes(micro_batch=1, gradient_checkpointing=True)).total
    raise ResourceError(
        f"--auto-fit: nothing fits the {capacity / GIB:.2f} GiB free on this GPU: micro-batch 1 with gradient checkpointing "
        f"is estimated at {smallest / GIB:.2f} GiB plus a {safety_margin(smallest) / GIB:.2f} GiB safety margin; lower "
        f"data.max_seq_len, use quantization.bits=4, or a bigger GPU (see qlora estimate RECIPE --gpu-memory SIZE)"
    )
