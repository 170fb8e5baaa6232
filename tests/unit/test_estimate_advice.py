"""The verdict and its advice: every suggested change is re-estimated, fits, and is the largest
that does (one more row or 64 more tokens would not)."""

from __future__ import annotations

import pytest

from qlora_cli.estimate import GIB, Gpu, Plan, estimate, resolve, verdict
from qlora_cli.estimate.advice import FITS, MIN_USEFUL_SEQ, SEQ_STEP, TIGHT, largest_fitting, safety_margin, solve, state_of


@pytest.mark.parametrize("limit", [1, 2, 7, 64, 100])
def test_largest_fitting_is_the_boundary(limit):
    assert largest_fitting(lambda n: n <= limit, 1, 100) == limit


def test_largest_fitting_none_when_nothing_fits():
    assert largest_fitting(lambda n: False, 1, 100) is None
    assert largest_fitting(lambda n: True, 5, 4) is None


def _apply(plan: Plan, change: str) -> Plan:
    fields = {"train.micro_batch_size": "micro_batch", "data.max_seq_len": "seq_len", "quantization.bits": "bits",
              "train.gradient_checkpointing": "gradient_checkpointing", "train.optimizer": "optimizer",
              "model.attn_implementation": "attention"}
    for assignment in change.split():
        key, _, value = assignment.partition("=")
        typed = int(value) if value.isdigit() else (value == "true") if value in ("true", "false") else value
        plan = plan.with_changes(**{fields[key]: typed})
    return plan


def test_batch_and_sequence_suggestions_are_maximal():
    arch = resolve("meta-llama/Llama-3.1-8B-Instruct")
    plan = Plan(micro_batch=8, seq_len=4096)
    card = Gpu("24 GiB", 24 * GIB)
    judged = verdict(estimate(arch, plan), card)
    assert not judged.fits
    by_key = {s.change.split("=")[0]: s for s in judged.suggestions}
    batch = int(by_key["train.micro_batch_size"].change.split("=")[1])
    fits = lambda changed: state_of(estimate(arch, changed).total, card.bytes) == FITS  # noqa: E731
    assert fits(plan.with_changes(micro_batch=batch)) and not fits(plan.with_changes(micro_batch=batch + 1))
    seq = int(by_key["data.max_seq_len"].change.split("=")[1])
    assert seq % SEQ_STEP == 0
    assert fits(plan.with_changes(seq_len=seq)) and not fits(plan.with_changes(seq_len=seq + SEQ_STEP))


def test_every_suggestion_is_re_estimated_and_fits():
    arch = resolve("Qwen/Qwen2.5-7B-Instruct")
    plan = Plan(bits=16, optimizer="adamw_torch", gradient_checkpointing=False, micro_batch=2, seq_len=2048)
    card = Gpu("T4", 15 * GIB)
    judged = verdict(estimate(arch, plan), card)
    assert judged.suggestions and all(s.fits for s in judged.suggestions)
    for suggestion in judged.suggestions:
        assert estimate(arch, _apply(plan, suggestion.change)).total == suggestion.total
    changes = " ".join(s.change for s in judged.suggestions)
    assert "quantization.bits=4" in changes and "train.gradient_checkpointing=true" in changes


def test_fitting_plan_reports_headroom_and_a_larger_batch():
    arch = resolve("mistralai/Mistral-7B-v0.3")
    result = estimate(arch, Plan())
    judged = verdict(result, Gpu("80 GiB", 80 * GIB))
    assert judged.fits and judged.headroom == 80 * GIB - result.total
    (tip,) = judged.suggestions
    assert tip.change.startswith("train.micro_batch_size=") and tip.total + safety_margin(tip.total) <= 80 * GIB


def test_70b_on_a_t4_cannot_fit_and_points_to_bigger_cards():
    arch = resolve("meta-llama/Llama-3.3-70B-Instruct")
    judged = verdict(estimate(arch, Plan(seq_len=1024)), Gpu("T4", 15 * GIB))
    assert not judged.fits and judged.suggestions == ()
    assert judged.bigger_cards[:2] == ("L40S", "A6000")


def test_70b_qlora_fits_a_48gb_card_as_in_the_qlora_paper():
    arch = resolve("meta-llama/Llama-3.3-70B-Instruct")
    assert verdict(estimate(arch, Plan(seq_len=1024)), Gpu("48 GB", 48 * 10**9)).fits


def test_paged_states_count_as_spillable():
    arch = resolve("huggyllama/llama-65b")
    result = estimate(arch, Plan(lora_r=64, optimizer="paged_adamw_32bit", micro_batch=4, seq_len=528))
    card = Gpu("tight", result.total - result.breakdown["optimizer_states"] // 2)
    judged = verdict(result, card)
    assert not judged.fits and judged.fits_with_paging


def test_three_states_at_the_boundary():
    """On the card but inside the safety margin is tight, not fits; a byte over is does not fit."""
    arch = resolve("meta-llama/Llama-3.1-8B-Instruct")
    result = estimate(arch, Plan(seq_len=2048))
    assert verdict(result, Gpu("roomy", result.total + safety_margin(result.total))).state == FITS
    assert verdict(result, Gpu("snug", result.total + safety_margin(result.total) - 1)).state == TIGHT
    assert verdict(result, Gpu("exact", result.total)).state == TIGHT
    over = verdict(result, Gpu("short", result.total - 1))
    assert over.state == "does not fit" and not over.fits and over.suggestions


@pytest.mark.parametrize("field", ["max_seq_len", "micro_batch_size"])
def test_solve_is_the_largest_value_that_fits_with_the_margin(field):
    arch, card = resolve("meta-llama/Llama-3.1-8B-Instruct"), 24 * GIB
    plan = Plan(seq_len=2048, micro_batch=1)
    value = solve(arch, plan, card, field)
    key, step = ("seq_len", SEQ_STEP) if field == "max_seq_len" else ("micro_batch", 1)
    assert value and value > 1
    assert state_of(estimate(arch, plan.with_changes(**{key: value})).total, card) == FITS
    assert state_of(estimate(arch, plan.with_changes(**{key: value + step})).total, card) != FITS


def test_no_sequence_suggestion_below_a_useful_length():
    """A run that fits only below MIN_USEFUL_SEQ tokens is not offered that length: solve says none."""
    arch = resolve("meta-llama/Llama-3.1-8B-Instruct")
    plan = Plan(seq_len=4096, micro_batch=64)
    floor = estimate(arch, plan.with_changes(seq_len=MIN_USEFUL_SEQ)).total
    card = Gpu("just short", floor + safety_margin(floor) - 1)
    assert solve(arch, plan, card.bytes, "max_seq_len") is None
    judged = verdict(estimate(arch, plan), card)
    assert not any(s.change.startswith("data.max_seq_len") for s in judged.suggestions)
    assert all(int(s.change.rpartition("=")[2]) >= MIN_USEFUL_SEQ for s in judged.suggestions if "max_seq_len" in s.change)
