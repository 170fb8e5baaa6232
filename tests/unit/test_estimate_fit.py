"""`qlora train --auto-fit` and `qlora estimate --solve`: the choice keeps the recipe's effective
batch, fits a stated capacity with the safety margin, is the largest micro-batch that does, turns
checkpointing on only when needed, and says in one line when nothing fits (no GPU needed)."""

from __future__ import annotations

import json

import pytest

from qlora_cli.errors import ResourceError
from qlora_cli.estimate import GIB, estimate, plan_from_recipe, resolve
from qlora_cli.estimate.advice import FITS, state_of
from qlora_cli.estimate.fit import auto_fit, divisors_descending
from qlora_cli.recipe.loader import validate_recipe
from tests.conftest import invoke, one_line_error, write_recipe

MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # shipped catalog: no download


def _recipe(micro: int, accumulation: int, checkpointing: bool = True, seq: int = 2048):
    return validate_recipe({
        "model": {"path": MODEL},
        "data": {"train": "x.jsonl", "format": "text", "max_seq_len": seq},
        "train": {"micro_batch_size": micro, "gradient_accumulation_steps": accumulation, "gradient_checkpointing": checkpointing},
        "output": {"dir": "run"},
    }, source="test")


def _total(recipe, **changes) -> int:
    return estimate(resolve(MODEL), plan_from_recipe(recipe).with_changes(**changes)).total


def test_auto_fit_keeps_the_effective_batch_and_takes_the_largest_micro_batch_that_fits():
    recipe = _recipe(micro=16, accumulation=2)  # 32 rows per optimizer step
    capacity = 24 * GIB
    choice = auto_fit(recipe, capacity)
    assert choice.micro_batch * choice.accumulation == 32
    assert choice.gradient_checkpointing and state_of(choice.total, capacity) == FITS
    larger = [d for d in divisors_descending(32) if d > choice.micro_batch]
    assert larger and all(state_of(_total(recipe, micro_batch=d), capacity) != FITS for d in larger)
    assert choice.overrides() == [f"train.micro_batch_size={choice.micro_batch}", f"train.gradient_accumulation_steps={choice.accumulation}",
                                  "train.gradient_checkpointing=true"]


def test_auto_fit_turns_checkpointing_on_only_when_nothing_fits_without_it():
    recipe = _recipe(micro=4, accumulation=1, checkpointing=False)
    without = _total(recipe, micro_batch=1, gradient_checkpointing=False)
    with_ckpt = _total(recipe, micro_batch=1, gradient_checkpointing=True)
    assert with_ckpt < without
    choice = auto_fit(recipe, int(1.2 * with_ckpt))  # between the two: only checkpointing fits
    assert choice.gradient_checkpointing and choice.micro_batch * choice.accumulation == 4
    roomy = auto_fit(recipe, 2 * _total(recipe, micro_batch=4, gradient_checkpointing=False))
    assert not roomy.gradient_checkpointing and roomy.micro_batch == 4 and roomy.accumulation == 1


def test_auto_fit_says_in_one_line_when_nothing_fits():
    with pytest.raises(ResourceError) as caught:
        auto_fit(_recipe(micro=2, accumulation=4), 4 * GIB)
    message = str(caught.value)
    assert "\n" not in message and "4.00 GiB free" in message and "micro-batch 1 with gradient checkpointing" in message


def test_train_auto_fit_refuses_without_cuda_in_one_line(tmp_path, recipe_dict):
    recipe = write_recipe(tmp_path, recipe_dict)
    line = one_line_error(invoke("train", recipe, "--auto-fit"), ResourceError.exit_code)
    assert "--auto-fit" in line and "CUDA" in line
    assert not (tmp_path / "run").exists()  # nothing written


def test_estimate_solve_prints_the_largest_sequence_that_fits():
    result = invoke("estimate", "--model", MODEL, "--gpu-memory", "24GiB", "--solve", "max_seq_len", "--json")
    assert result.exit_code == 0, result.output
    solved = json.loads(result.stdout)["solved"]
    assert solved["key"] == "data.max_seq_len" and solved["value"] >= 1024
    total = estimate(resolve(MODEL), plan_from_recipe(_recipe(1, 1, seq=solved["value"]))).total
    assert state_of(total, 24 * GIB) == FITS


def test_estimate_solve_needs_a_card():
    line = one_line_error(invoke("estimate", "--model", MODEL, "--solve", "max_seq_len"), 2)
    assert "--gpu" in line
