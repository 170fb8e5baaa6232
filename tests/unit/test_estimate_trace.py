"""The memory tracer (estimate/trace.py): it counts storages exactly, and a few rows of the grid
in docs/estimate-validation.md recomputed: the estimate within 5% of one traced training step."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_cli.estimate import estimate, plan_from_recipe, resolve
from qlora_cli.estimate.trace import LiveBytes, trace_step
from qlora_cli.recipe.loader import validate_recipe
from tests.conftest import invoke, write_recipe
from tests.families import build_family

DEVICE_TERMS = ("allocator_overhead", "cuda_context")


def test_live_bytes_counts_each_storage_once_and_sees_frees():
    counter = LiveBytes()
    with counter:
        a = torch.zeros(1000)  # 4000 B
        view = a[10:20]  # a view: no new storage
        a.add_(1)  # in place: no new storage
        b = a * 2  # 4000 B more: peak 8000
        del a, view, b
        c = torch.zeros(500)  # after the frees: 2000 B live
        c = c + 1
    assert counter.peak == 8000
    counter.sweep()
    assert counter.live == 2000


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grid-llama")
    build_family("llama", 1024).save_pretrained(folder)
    return folder


def _recipe(folder, **train):
    seq = train.pop("seq", 256)
    bits = train.pop("bits", 4)
    packing = train.pop("packing", True)
    return validate_recipe({
        "model": {"path": str(folder), "dtype": "bfloat16", "attn_implementation": "sdpa"},
        "quantization": {"bits": bits},
        "lora": {"r": 8, "dropout": 0.05},
        "data": {"train": "(grid)", "format": "text", "max_seq_len": seq, "packing": packing},
        "train": {"optimizer": "paged_adamw_8bit", **train},
        "output": {"dir": "(grid)"},
    }, source="test")


# Rows of scripts/estimate_grid.py small enough for a unit test (seconds each on the tiny Llama).
ROWS = [
    {"gradient_checkpointing": True, "loss_kernel": "chunked"},
    {"gradient_checkpointing": False, "loss_kernel": "chunked"},
    {"gradient_checkpointing": False, "loss_kernel": "standard", "bits": 16},
    {"gradient_checkpointing": True, "loss_kernel": "standard", "micro_batch_size": 2, "packing": False},
]


def test_the_backward_of_a_recomputed_layer_is_within_five_percent(tiny_llama):
    """The grid's former worst row (padded micro-batch 4, checkpointing): its peak is one layer's
    backward, where the LoRA input's fp32 gradient (peft's casts, dropout) sits beside the layer's set."""
    recipe = _recipe(tiny_llama, seq=1024, micro_batch_size=4, packing=False, gradient_checkpointing=True, loss_kernel="chunked")
    traced = trace_step(recipe)
    breakdown = estimate(resolve(str(tiny_llama)), plan_from_recipe(recipe)).breakdown
    allocated = sum(value for term, value in breakdown.items() if term not in DEVICE_TERMS)
    assert traced.phase_at_peak == "backward_working"
    assert abs(allocated / traced.peak - 1) <= 0.05, (allocated, traced.peak, traced.largest)


@pytest.mark.parametrize("row", ROWS, ids=lambda row: "-".join(f"{k}={v}" for k, v in row.items()))
def test_estimate_is_within_five_percent_of_the_traced_step(tiny_llama, row):
    recipe = _recipe(tiny_llama, **dict(row))
    traced = trace_step(recipe)
    breakdown = estimate(resolve(str(tiny_llama)), plan_from_recipe(recipe)).breakdown
    allocated = sum(value for term, value in breakdown.items() if term not in DEVICE_TERMS)
    assert abs(allocated / traced.peak - 1) <= 0.05, (allocated, traced.peak, traced.at_peak)
    terms = traced.as_estimate_terms()
    assert terms["adapter_weights"] == breakdown["adapter_weights"]  # exact: fp32 LoRA A and B
    assert terms["optimizer_states"] == breakdown["optimizer_states"]  # exact: bnb's states, created in the warm-up step
    assert traced.notes and "dropout masks" in traced.notes[0]  # CPU masks counted as CUDA keeps them


def test_estimate_trace_prints_the_traced_peak_beside_the_estimate(tiny_llama, tmp_path):
    recipe = {
        "model": {"path": str(tiny_llama), "dtype": "bfloat16"},
        "data": {"train": "x.jsonl", "format": "text", "max_seq_len": 128},
        "train": {"optimizer": "adamw_torch"},
        "output": {"dir": str(tmp_path / "run")},
    }
    result = invoke("estimate", write_recipe(tmp_path, recipe), "--trace", "--json")
    assert result.exit_code == 0, result.output
    traced = json.loads(result.stdout)["traced"]
    assert traced["dtype"] == "bfloat16" and traced["device"] == "cpu"
    assert abs(traced["error_pct"]) <= 5 and traced["peak_gib"] > 0
    assert not (tmp_path / "run").exists()  # an estimate writes nothing
