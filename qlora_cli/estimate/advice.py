"""The verdict against a card, and when it does not fit, concrete changes that make it fit, each
re-estimated: the largest micro-batch or sequence length (binary search, since memory grows with
both), 4-bit, gradient checkpointing, an 8-bit optimizer, sdpa attention, or a bigger card."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from qlora_cli.estimate.architecture import Architecture
from qlora_cli.estimate.budget import Estimate, estimate
from qlora_cli.estimate.gpu import Gpu, cards_that_fit
from qlora_cli.estimate.plan import Plan

SEQ_STEP = 64  # suggested sequence lengths are rounded down to a multiple of this
MAX_SUGGESTED_BATCH = 256
MIN_USEFUL_SEQ = 256  # no suggestion shorter than this: a run that only fits below it does not fit
# The verdict's safety margin: "fits" needs this much room left on the card beyond the estimate
# (5% of the total, at least 0.5 GiB); inside it the run is "tight" (it may OOM). The grid in
# docs/estimate-validation.md puts the allocated peak within a few % of the trace, and the margin
# covers what the arithmetic leaves to the device (allocator rounding beyond its 10%, workspaces).
SAFETY_FRACTION = 0.05
MIN_SAFETY_BYTES = 512 * 2**20
FITS, TIGHT, DOES_NOT_FIT = "fits", "tight", "does not fit"


def safety_margin(total: int) -> int:
    return max(MIN_SAFETY_BYTES, int(SAFETY_FRACTION * total))


def state_of(total: int, budget: int) -> str:
    """fits (room for the margin), tight (on the card, inside the margin: may OOM), does not fit."""
    if total + safety_margin(total) <= budget:
        return FITS
    return TIGHT if total <= budget else DOES_NOT_FIT


@dataclass(frozen=True)
class Suggestion:
    change: str  # recipe keys, as for --set: "train.micro_batch_size=2"
    total: int
    fits: bool  # with the safety margin


@dataclass(frozen=True)
class Verdict:
    gpu: Gpu
    total: int
    suggestions: tuple[Suggestion, ...]
    bigger_cards: tuple[str, ...] = ()
    pageable: int = 0

    @property
    def state(self) -> str:
        return state_of(self.total, self.gpu.bytes)

    @property
    def fits(self) -> bool:
        """Fits with the safety margin (a tight run is not called fitting)."""
        return self.state == FITS

    @property
    def headroom(self) -> int:
        return self.gpu.bytes - self.total

    @property
    def fits_with_paging(self) -> bool:
        """Over the card only by optimizer states that a paged optimizer can evict to CPU RAM."""
        return self.fits or self.total - self.pageable <= self.gpu.bytes


def largest_fitting(fits: Callable[[int], bool], low: int, high: int) -> Optional[int]:
    """The largest n in [low, high] with fits(n), for a fits() that holds up to some n and fails after."""
    if high < low or not fits(low):
        return None
    while low < high:
        middle = (low + high + 1) // 2
        if fits(middle):
            low = middle
        else:
            high = middle - 1
    return low


def _total(arch: Architecture, plan: Plan) -> int:
    return estimate(arch, plan).total


def _fits(arch: Architecture, plan: Plan, budget: int) -> bool:
    return state_of(_total(arch, plan), budget) == FITS


def solve(arch: Architecture, plan: Plan, budget: int, field: str) -> Optional[int]:
    """The largest data.max_seq_len (a multiple of SEQ_STEP, at least MIN_USEFUL_SEQ, at most the
    model's context when known) or train.micro_batch_size that fits `budget` with the safety margin,
    the rest of the plan held; None when not even the smallest useful value fits."""
    if field == "max_seq_len":
        top = arch.context_length or 1 << 20
        steps = largest_fitting(lambda n: _fits(arch, plan.with_changes(seq_len=n * SEQ_STEP), budget), MIN_USEFUL_SEQ // SEQ_STEP, top // SEQ_STEP)
        return steps * SEQ_STEP if steps else None
    if field == "micro_batch_size":
        return largest_fitting(lambda n: _fits(arch, plan.with_changes(micro_batch=n), budget), 1, MAX_SUGGESTED_BATCH)
    raise ValueError(f"cannot solve for {field}")


def _toggles(plan: Plan) -> list[tuple[str, dict]]:
    toggles = []
    if plan.bits != 4:
        toggles.append(("quantization.bits=4", {"bits": 4}))
    if not plan.gradient_checkpointing:
        toggles.append(("train.gradient_checkpointing=true", {"gradient_checkpointing": True}))
    if plan.optimizer in ("adamw_torch", "paged_adamw_32bit"):
        toggles.append(("train.optimizer=paged_adamw_8bit", {"optimizer": "paged_adamw_8bit"}))
    if plan.attention == "eager":
        toggles.append(("model.attn_implementation=sdpa", {"attention": "sdpa"}))
    elif plan.attention == "sdpa" and plan.micro_batch > 1:  # no T^2 mask; needs flash-attn installed
        toggles.append(("model.attn_implementation=flash_attention_2", {"attention": "flash_attention_2"}))
    return toggles


def _shape_suggestions(arch: Architecture, plan: Plan, budget: int, prefix: str = "") -> list[Suggestion]:
    """The largest micro-batch and the largest useful sequence length that fit, the other held fixed."""
    found = []
    batch = largest_fitting(lambda n: _fits(arch, plan.with_changes(micro_batch=n), budget), 1, plan.micro_batch - 1)
    if batch:
        found.append(Suggestion(f"{prefix}train.micro_batch_size={batch}", _total(arch, plan.with_changes(micro_batch=batch)), True))
    if plan.seq_len > MIN_USEFUL_SEQ:
        seq = solve(arch, plan, budget, "max_seq_len")
        if seq and seq < plan.seq_len:
            found.append(Suggestion(f"{prefix}data.max_seq_len={seq}", _total(arch, plan.with_changes(seq_len=seq)), True))
    return found


def verdict(result: Estimate, gpu: Gpu) -> Verdict:
    """Fits with room for the safety margin (and how large a micro-batch would), tight, or what to
    change so that it fits. Every suggestion is re-estimated and fits with the margin."""
    arch, plan, budget = result.arch, result.plan, gpu.bytes
    if state_of(result.total, budget) == FITS:
        batch = largest_fitting(lambda n: _fits(arch, plan.with_changes(micro_batch=n), budget), plan.micro_batch, MAX_SUGGESTED_BATCH)
        tips = ()
        if batch and batch > plan.micro_batch:
            tips = (Suggestion(f"train.micro_batch_size={batch}", _total(arch, plan.with_changes(micro_batch=batch)), True),)
        return Verdict(gpu, result.total, tips, pageable=result.pageable)
    suggestions = _shape_suggestions(arch, plan, budget)
    combined, combined_keys = plan, []
    for change, fields in _toggles(plan):
        total = _total(arch, plan.with_changes(**fields))
        suggestions.append(Suggestion(change, total, state_of(total, budget) == FITS))
        combined, combined_keys = combined.with_changes(**fields), combined_keys + [change]
    if len(combined_keys) > 1:
        total = _total(arch, combined)
        suggestions.append(Suggestion(" ".join(combined_keys), total, state_of(total, budget) == FITS))
    if combined_keys and not _fits(arch, combined, budget):
        suggestions.extend(_shape_suggestions(arch, combined, budget, prefix=" ".join(combined_keys) + " "))
    fitting = tuple(s for s in suggestions if s.fits)
    bigger = tuple(cards_that_fit(result.total + safety_margin(result.total))[:3])
    if not fitting and (combined_keys or plan.micro_batch > 1):  # the smallest we can make it, still over
        keys = combined_keys + (["train.micro_batch_size=1"] if plan.micro_batch > 1 else [])
        fitting = (Suggestion(" ".join(keys), _total(arch, combined.with_changes(micro_batch=1)), False),)
    return Verdict(gpu, result.total, fitting, bigger, pageable=result.pageable)
