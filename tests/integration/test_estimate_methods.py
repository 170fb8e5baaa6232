"""`qlora estimate`'s trainable-parameter arithmetic for every method against what peft (or our
bottleneck adapter) creates on the real demo model (SmolLM2-135M: 30 layers, hidden 576, GQA 9/3
heads). The tiny-model counts are checked against training in tests/unit/test_adapters.py."""

from __future__ import annotations

import copy

import pytest

from qlora_cli.estimate import plan_from_recipe, resolve
from qlora_cli.estimate.methods import trainable_params
from qlora_cli.model import adapters
from qlora_cli.model.loading import count_parameters, load_base_model, prepare_for_training
from qlora_cli.recipe.loader import validate_recipe
from tests.conftest import DEMO_MODEL

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not DEMO_MODEL.is_dir(), reason="demo model missing: run `qlora demo-model`")]

CASES = {
    "ia3": {"method": "ia3"},
    "ia3-layers": {"method": "ia3", "layers_to_transform": [0, 29], "ia3": {"target_modules": ["q_proj", "down_proj"], "feedforward_modules": ["down_proj"]}},
    "prompt": {"method": "prompt_tuning", "prompt_tuning": {"num_virtual_tokens": 16}},
    "prefix": {"method": "prefix_tuning"},
    "prefix-projection": {"method": "prefix_tuning", "prefix_tuning": {"projection": True, "encoder_hidden_size": 64}},
    "p-tuning": {"method": "p_tuning", "p_tuning": {"encoder_hidden_size": 96}},
    "bottleneck": {"method": "bottleneck", "bottleneck": {"size": 32}},
    "bottleneck-mlp-layers": {"method": "bottleneck", "layers_to_transform": [3, 4], "bottleneck": {"size": 16, "placement": ["mlp"]}},
    "lora-layers-unfreeze": {"method": "lora", "layers_to_transform": [1, 2, 3], "unfreeze": ["*.input_layernorm", "model.norm"]},
}


def recipe_for(adapter: dict):
    data = {"model": {"path": str(DEMO_MODEL), "dtype": "bfloat16"}, "quantization": {"bits": 16}, "adapter": adapter,
            "data": {"train": "unused.jsonl", "format": "chat"}, "output": {"dir": "unused"}}
    if adapter["method"] == "lora":
        data["lora"] = {"r": 8}
    return validate_recipe(data)


@pytest.fixture(scope="module")
def demo_base():
    return load_base_model(recipe_for({"method": "ia3"}))


@pytest.mark.parametrize("case", list(CASES))
def test_estimated_trainable_params_equal_the_attached_adapter(demo_base, case):
    recipe = recipe_for(CASES[case])
    model = adapters.attach(prepare_for_training(copy.deepcopy(demo_base), gradient_checkpointing=False), recipe).model
    trainable, _ = count_parameters(model)
    assert trainable_params(resolve(str(DEMO_MODEL)), plan_from_recipe(recipe)) == trainable
