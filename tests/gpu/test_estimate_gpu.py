"""`qlora estimate --measure` on CUDA: three real steps of the recipe, the measured peak beside the
estimate. The full grid of settings is scripts/gpu_memory_grid.py (step 2 of scripts/gpu_check.sh)."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import qlora

pytestmark = pytest.mark.gpu


def test_estimate_measure_reports_a_peak_near_the_estimate(gpu_model_dir):
    result = qlora("estimate", "configs/quickstart.yaml", "--set", f"model.path={gpu_model_dir}", "--measure", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads(result.stdout.strip().splitlines()[-1])
    measured = payload["measured"]
    assert measured["steps"] == 3
    assert 0 < measured["peak_allocated_gib"] <= measured["peak_reserved_gib"] <= measured["peak_total_gib"], measured
    # A 135M model: the CUDA context dominates both sides, so a factor of 2 either way is a broken term.
    assert 0.5 < payload["total_gib"] / measured["peak_total_gib"] < 2, (payload["breakdown"], measured)
