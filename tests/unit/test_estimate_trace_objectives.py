"""One real DPO step and one real GRPO step (generation + loss) of `qlora train` on the tiny Llama,
traced (estimate/trace_trainer.py): the estimate within 5%, the rows of scripts/estimate_objectives.py
at smaller shapes. Both TRL trainers score tokens with TRL's chunked log-prob head, whose tile buffer
is most of these small steps; the shapes are the worst case the data allow (rows cut to max_seq_len,
completions max_completion_len long)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from qlora_cli.estimate import estimate, plan_from_recipe, resolve
from qlora_cli.estimate.trace_trainer import trace_trainer_step
from tests.conftest import ROOT

DEVICE_TERMS = ("allocator_overhead", "cuda_context")


@pytest.fixture(scope="module")
def objectives_script():
    spec = importlib.util.spec_from_file_location("estimate_objectives", ROOT / "scripts" / "estimate_objectives.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["estimate_objectives"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("objective, row", [
    ("dpo", {"seq": 128, "mb": 2, "ckpt": False}),
    ("grpo", {"seq": 64, "mb": 4, "completion": 32, "ckpt": True, "beta": 0.04}),
], ids=["dpo", "grpo"])
def test_an_objective_step_is_within_five_percent_of_its_estimate(objectives_script, tmp_path, objective, row):
    model = objectives_script.tiny_model(tmp_path / "tiny")
    recipe = objectives_script.recipe_for(model, objectives_script.write_data(tmp_path, objective, row["seq"]), objective, row)
    traced = trace_trainer_step(recipe)
    breakdown = estimate(resolve(str(model)), plan_from_recipe(recipe)).breakdown
    allocated = sum(value for term, value in breakdown.items() if term not in DEVICE_TERMS)
    assert abs(allocated / traced.peak - 1) <= 0.05, (allocated, traced.peak, traced.at_peak, traced.largest)
    assert traced.at_peak["optimizer_states"] == breakdown["optimizer_states"]  # the Trainer's own optimizer, after step 1
    if objective == "grpo":
        assert "generation_kv_cache" in breakdown


@pytest.mark.parametrize("objective, data_format, loss_type, head", [
    ("dpo", "preference", "sigmoid", "trl"),
    ("kto", "unpaired_preference", "sigmoid", "trl"),
    ("dpo", "preference", "simpo", "full logits"),
    ("orpo", "preference", "sigmoid", "full logits"),
])
def test_each_objective_is_estimated_with_the_loss_head_its_trainer_uses(recipe_dict, objective, data_format, loss_type, head):
    """TRL's DPO and KTO trainers score tokens with TRL's chunked head; its ORPO and CPO (SimPO) trainers
    take the model's full logits, whatever train.loss_kernel says."""
    from qlora_cli.estimate import activations, objectives
    from tests.conftest import recipe_from

    recipe = recipe_from(recipe_dict, train={"objective": objective, "loss_kernel": "auto"}, data={"format": data_format},
                         preference={"loss_type": loss_type})
    plan = plan_from_recipe(recipe)
    arch = resolve(recipe.model.path)
    expected = objectives.trl_head_bytes(arch, plan) if head == "trl" else activations.LOSS_BYTES_PER_LOGIT * plan.tokens * arch.vocab_size
    assert activations.logits_bytes(arch, plan) == expected
