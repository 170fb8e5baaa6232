"""Layer-wise learning-rate scaling: the optimizer the trainer builds holds one group per depth,
each at learning_rate x decay^(L-1-depth), and the scheduler keeps those ratios."""

import json

import pytest
from transformers import TrainerCallback

from qlora_cli.recipe.loader import validate_recipe
from qlora_cli.train.layer_lr import depth_of, layer_scale
from qlora_cli.train.run import run_training


class GrabOptimizer(TrainerCallback):
    def __init__(self):
        self.groups = None
        self.lrs_at_end = None

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self.groups = [{"initial_lr": g["initial_lr"], "names": list(g.get("names", [])), "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]

    def on_train_end(self, args, state, control, optimizer=None, **kwargs):
        self.lrs_at_end = [g["lr"] for g in optimizer.param_groups]


def test_depth_and_scale():
    assert depth_of("base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight", 2) == 1
    assert depth_of("base_model.model.model.embed_tokens.modules_to_save.default.weight", 2) == -1
    assert depth_of("prompt_encoder.default.embedding.weight", 2) == -1
    assert depth_of("base_model.model.lm_head.modules_to_save.default.weight", 2) == 1
    assert layer_scale(1, 2, 0.5) == 1.0 and layer_scale(0, 2, 0.5) == 0.5 and layer_scale(-1, 2, 0.5) == 0.25


def test_optimizer_groups_carry_the_configured_rate_per_layer(recipe_dict):
    data = json.loads(json.dumps(recipe_dict))
    data["adapter"] = {"layer_lr_decay": 0.5, "unfreeze": ["model.embed_tokens", "lm_head"]}
    data["train"].update({"max_steps": 2, "learning_rate": 1e-2, "weight_decay": 0.1, "lr_scheduler": "constant", "warmup_steps": 0})
    grab = GrabOptimizer()
    run_training(validate_recipe(data), show_progress=False, callbacks=(grab,))
    by_rate = {}
    for group in grab.groups:
        for name in group["names"]:
            by_rate[name] = group["initial_lr"]
    layer1 = [rate for name, rate in by_rate.items() if ".layers.1." in name]
    layer0 = [rate for name, rate in by_rate.items() if ".layers.0." in name]
    embed = [rate for name, rate in by_rate.items() if "embed_tokens" in name]
    head = [rate for name, rate in by_rate.items() if "lm_head" in name]
    assert len(layer1) == len(layer0) == 14  # A and B of 7 linears per layer
    assert layer1 == pytest.approx([1e-2] * 14) and layer0 == pytest.approx([5e-3] * 14)
    assert embed == [pytest.approx(2.5e-3)] and head == [pytest.approx(1e-2)]
    # A constant schedule leaves each group at its own rate.
    assert sorted(grab.lrs_at_end) == sorted(g["initial_lr"] for g in grab.groups)
    assert {g["weight_decay"] for g in grab.groups} == {0.1}  # LoRA weights and 2-D copies all decay


def test_without_decay_the_trainer_builds_its_usual_two_groups(recipe_dict):
    grab = GrabOptimizer()
    run_training(validate_recipe(recipe_dict), show_progress=False, callbacks=(grab,))
    assert len(grab.groups) == 2 and all(g["initial_lr"] == pytest.approx(2e-4) for g in grab.groups)
