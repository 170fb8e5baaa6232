"""The published figures of docs/estimate-validation.md section 4, recomputed (pure arithmetic): no
run that ran out of memory is called "fits", every "largest that fits" is at most the published
maximum, and the verdicts on Mixtral QLoRA on an 80 GB card follow the experts' layout."""

from __future__ import annotations

import pytest

from tests.conftest import load_script


@pytest.fixture(scope="module")
def results():
    module = load_script("estimate_published")
    return [module.evaluate(row) for row in module.ROWS]


def test_no_published_oom_fits_and_every_largest_length_is_conservative(results):
    assert [p for r in results for p in r["problems"]] == []
    ooms = [r for r in results if r["row"].oom]
    assert len(ooms) >= 5 and all(r["state"] != "fits" for r in ooms)
    lengths = [r for r in results if r["row"].max_seq]
    assert lengths and all(r["solved"] <= r["row"].max_seq for r in lengths)


def test_mixtral_qlora_on_80gb_fits_with_nf4_experts_and_not_with_16_bit_fused_ones(results):
    mixtral = [r for r in results if "Mixtral" in r["row"].model and r["row"].card_gib == 80]
    per_expert = [r["state"] for r in mixtral if r["row"].expert_layout == "per-expert"]
    fused = [r["state"] for r in mixtral if r["row"].expert_layout == "fused"]
    assert per_expert and set(per_expert) == {"fits"}
    assert fused == ["does not fit"]


def test_measured_peaks_of_the_hf_bnb_stack_are_within_five_percent(results):
    fms = [r for r in results if r["row"].source.startswith("fms-hf-tuning") and "error" in r]
    assert len(fms) == 5
    assert all(abs(r["error"]) <= 0.05 for r in fms), [(r["row"].setting, r["error"]) for r in fms]
