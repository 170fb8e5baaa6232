"""Every PEFT method on the tiny Llama: the loss falls, the trainer's trainable-parameter count
equals the estimate's arithmetic, the saved adapter loads for evaluation; recipe checks of the
adapter section; the bottleneck adapter starts at the base model and round-trips through safetensors."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from qlora_cli import rundir
from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.estimate.architecture import from_config
from qlora_cli.estimate.methods import trainable_params
from qlora_cli.estimate.plan import plan_from_recipe
from qlora_cli.model import adapters, loading
from qlora_cli.model.adapters import bottleneck
from qlora_cli.recipe.loader import load_recipe, recipe_to_yaml, validate_recipe
from qlora_cli.train.run import run_training
from tests.conftest import losses

METHOD_LR = {"lora": 3e-2, "ia3": 5e-2, "prompt_tuning": 5e-2, "prefix_tuning": 3e-2, "p_tuning": 3e-2, "bottleneck": 3e-2}


def method_recipe(recipe_dict, method, **adapter):
    data = json.loads(json.dumps(recipe_dict))
    data["adapter"] = {"method": method, **adapter}
    if method != "lora":
        del data["lora"]
    data["train"].update({"max_steps": 10, "learning_rate": METHOD_LR[method], "save_steps": 100})
    return data


def estimated(recipe):
    config = json.loads((Path(recipe.model.path) / "config.json").read_text())
    return trainable_params(from_config(config, "tiny", "test"), plan_from_recipe(recipe))


@pytest.mark.parametrize("method,bits", [
    ("ia3", 16), ("prompt_tuning", 16), ("prefix_tuning", 16), ("p_tuning", 16), ("bottleneck", 16), ("bottleneck", 4), ("ia3", 4),
])
def test_each_method_trains_and_its_count_matches_the_estimate(recipe_dict, method, bits):
    data = method_recipe(recipe_dict, method)
    data["quantization"] = {"bits": bits}
    recipe = validate_recipe(data)
    result = run_training(recipe, show_progress=False)
    curve = list(losses(result.output_dir).values())
    assert curve[-1] < 0.8 * curve[0], curve
    assert result.metrics["trainable_params"] == estimated(recipe)
    # The run directory reloads (recipe.yaml without the unused sections) and its adapter loads on the base.
    reloaded = load_recipe(result.output_dir)
    assert reloaded.adapter.method == method and "lora" not in (result.output_dir / "recipe.yaml").read_text().split("adapter:")[0]
    assert adapters.adapter_type(result.output_dir) == {"p_tuning": "P_TUNING"}.get(method, method.upper())


def test_plain_lora_recipes_keep_working(recipe_dict):
    recipe = validate_recipe(recipe_dict)
    assert recipe.adapter.method == "lora" and recipe.lora.init == "default" and recipe.data.packing
    assert validate_recipe(yaml.safe_load(recipe_to_yaml(recipe))) == recipe


@pytest.mark.parametrize("change,message", [
    ({"adapter": {"method": "ia3"}}, "gives `lora` settings but adapter.method is ia3"),
    ({"adapter": {"ia3": {"target_modules": ["q_proj"]}}}, "gives `adapter.ia3` settings but adapter.method is lora"),
    ({"lora": None, "adapter": {"method": "prompt_tuning"}, "data": {"packing": True}}, "data.packing cannot be used with prompt_tuning"),
    ({"lora": None, "adapter": {"method": "prefix_tuning"}, "train": {"gradient_checkpointing": True}}, "gradient_checkpointing cannot be used with prefix_tuning"),
    ({"lora": None, "adapter": {"method": "p_tuning", "layers_to_transform": [0]}}, "layers_to_transform applies to lora"),
    ({"lora": {"init": "pissa"}, "quantization": {"bits": 4}}, "pissa needs a 16-bit base"),
    ({"lora": {"init": "loftq"}, "quantization": {"bits": 16}}, "loftq fits the adapter to the NF4"),
    ({"lora": {"init": "olora", "use_dora": True}}, "cannot be combined with lora.use_dora"),
])
def test_adapter_section_mistakes_are_one_line_errors(recipe_dict, change, message):
    data = json.loads(json.dumps(recipe_dict))
    for section, values in change.items():
        if values is None:
            data[section] = None
        else:
            data.setdefault(section, {}).update(values)
    with pytest.raises(ConfigError) as caught:
        validate_recipe(data)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_prompt_methods_turn_packing_off(recipe_dict):
    data = method_recipe(recipe_dict, "prompt_tuning")
    recipe = validate_recipe(data)
    assert recipe.data.packing is False
    assert validate_recipe(yaml.safe_load(recipe_to_yaml(recipe))).data.packing is False


def test_lora_init_layers_and_unfrozen_norms(recipe_dict, tmp_path):
    data = json.loads(json.dumps(recipe_dict))
    data["lora"].update({"init": "pissa", "target_modules": ["q_proj", "v_proj"]})
    data["adapter"] = {"layers_to_transform": [1], "unfreeze": ["*.post_attention_layernorm"]}
    data["train"].update({"max_steps": 3, "save_steps": 100})
    recipe = validate_recipe(data)
    result = run_training(recipe, show_progress=False)
    # r=4 on q (64->64) and v (64->32) of layer 1 only, plus the two 64-wide norms trained in full.
    assert result.metrics["trainable_params"] == 4 * (64 + 64) + 4 * (64 + 32) + 2 * 64 == estimated(recipe)
    config = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["r"] == 8  # PiSSA saved converted to a plain LoRA of rank 2r
    assert config["layers_to_transform"] == [1] and len(config["modules_to_save"]) == 2


def test_quantized_layers_cannot_be_unfrozen(recipe_dict):
    data = json.loads(json.dumps(recipe_dict))
    data["quantization"] = {"bits": 4}
    data["adapter"] = {"unfreeze": ["model.layers.0.mlp.down_proj"]}
    with pytest.raises(ConfigError, match="is quantized and cannot be trained"):
        run_training(validate_recipe(data), show_progress=False)


def test_bottleneck_starts_at_the_base_and_round_trips(tiny_model_dir, tmp_path):
    recipe = validate_recipe({
        "model": {"path": str(tiny_model_dir), "dtype": "float32"}, "quantization": {"bits": 16},
        "adapter": {"method": "bottleneck", "bottleneck": {"size": 8, "placement": ["mlp"]}},
        "data": {"train": "x.jsonl", "format": "chat"}, "output": {"dir": str(tmp_path / "run")},
    })
    model = loading.load_base_model(recipe)
    ids = torch.tensor([[3, 5, 6, 7, 9]])
    with torch.no_grad():
        base = model(ids).logits
        adapter = adapters.attach(model, recipe)
        assert torch.equal(model(ids).logits, base), "a zero up-projection must leave the model unchanged"
        for _, slot in bottleneck.slots(model):
            torch.nn.init.normal_(slot.adapters["default"].up.weight)
        trained = model(ids).logits
    assert not torch.allclose(trained, base)
    adapter.save(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [rundir.BOTTLENECK_CONFIG, rundir.BOTTLENECK_WEIGHTS]
    fresh = adapters.load_adapters(loading.load_base_model(recipe), [("topics", tmp_path / "adapter")]).model
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, trained, atol=1e-6)
        with adapters.only_base(fresh):
            assert torch.allclose(fresh(ids).logits, base, atol=1e-6)
    other = loading.load_base_model(recipe)
    bottleneck.attach(other, {"size": 4, "placement": ["mlp"], "activation": "relu"}, "smaller")
    with pytest.raises(ModelError, match="does not fit this model"):
        bottleneck.load_weights(other, tmp_path / "adapter", "smaller")


def test_a_bottleneck_run_checkpoints_and_resumes(recipe_dict):
    from qlora_cli.train.checkpointing import checkpoint_problem, newest_intact

    data = method_recipe(recipe_dict, "bottleneck")
    data["train"].update({"max_steps": 2, "save_steps": 1})
    first = run_training(validate_recipe(data), show_progress=False)
    found, skipped = newest_intact(first.output_dir)
    assert found is not None and found.name == "checkpoint-2" and skipped == [], skipped
    assert checkpoint_problem(found) is None
    data["train"]["max_steps"] = 3
    resumed = run_training(validate_recipe(data), resume=True, show_progress=False)
    assert resumed.info["resumed_from"].endswith("checkpoint-2") and resumed.metrics["global_step"] == 3
    assert (resumed.output_dir / rundir.BOTTLENECK_WEIGHTS).is_file()
