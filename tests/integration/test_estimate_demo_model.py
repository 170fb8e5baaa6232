"""The estimate against the real demo model (SmolLM2-135M-Instruct) loaded the way training loads
it (model.loading.load_base_model): weight bytes in 4-bit and 16-bit, peft's trainable count for several
adapters, and the activations autograd saves. Skipped when `qlora demo-model` has not been run."""

from __future__ import annotations

import copy

import pytest

from qlora_cli.estimate import Plan, plan_from_recipe, resolve
from qlora_cli.estimate.memory import base_weight_bytes, trainable_params
from qlora_cli.recipe.loader import validate_recipe
from qlora_cli.recipe.schema import LoraSection
from tests.conftest import DEMO_MODEL, expected_cpu_bytes, measured_saved_bytes, random_batch

pytestmark = [pytest.mark.integration, pytest.mark.skipif(not DEMO_MODEL.is_dir(), reason="demo model missing: run `qlora demo-model`")]


def demo_recipe(**quantization):
    return validate_recipe({
        "model": {"path": str(DEMO_MODEL), "dtype": "bfloat16"},
        "quantization": quantization,
        "data": {"train": "unused.jsonl", "format": "chat"},
        "output": {"dir": "unused"},
    })


def stored_bytes(model) -> int:
    """Parameters, buffers and bitsandbytes quantization state, each storage counted once."""
    seen, total = set(), 0

    def add(tensor):
        nonlocal total
        if tensor is None or tensor.untyped_storage().data_ptr() in seen:
            return
        seen.add(tensor.untyped_storage().data_ptr())
        total += tensor.numel() * tensor.element_size()

    for tensor in list(model.parameters()) + list(model.buffers()):
        add(tensor)
        state = getattr(tensor, "quant_state", None)
        if state is not None:
            for part in (state.absmax, state.code) + ((state.state2.absmax, state.offset) if state.nested else ()):
                add(part)
        add(getattr(tensor, "SCB", None))
    return total


@pytest.fixture(scope="module")
def bf16_model():
    from qlora_cli.model.loading import load_base_model

    return load_base_model(demo_recipe(bits=16))


def test_config_json_is_read_from_the_folder():
    arch = resolve(str(DEMO_MODEL))
    assert (arch.hidden_size, arch.num_layers, arch.num_heads, arch.num_kv_heads, arch.vocab_size) == (576, 30, 9, 3, 49152)
    assert arch.tie_embeddings and arch.source.endswith("config.json")


def test_16bit_weights_equal_the_loaded_model(bf16_model):
    recipe = demo_recipe(bits=16)
    estimated = sum(base_weight_bytes(resolve(recipe.model.path), plan_from_recipe(recipe)).values())
    assert estimated == pytest.approx(stored_bytes(bf16_model), rel=0.02)
    assert estimated == 2 * 134_515_008


def test_4bit_weights_equal_the_loaded_model():
    """NF4 with double quant (the recipe default); without it, test_estimate_memory checks one weight."""
    from qlora_cli.model.loading import load_base_model

    recipe = demo_recipe(bits=4, double_quant=True)
    model = load_base_model(recipe)
    estimated = sum(base_weight_bytes(resolve(recipe.model.path), plan_from_recipe(recipe)).values())
    assert estimated == pytest.approx(stored_bytes(model), rel=0.02)


@pytest.mark.parametrize(
    "lora",
    [
        dict(r=8, target_modules="all-linear"),
        dict(r=16, target_modules=["q_proj", "v_proj"]),
        dict(r=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], use_dora=True),
        dict(r=4, target_modules=["gate_proj", "up_proj", "down_proj"], modules_to_save=["lm_head"]),
    ],
    ids=["r8-all-linear", "r16-qv", "r32-attn-dora", "r4-mlp-save-head"],
)
def test_trainable_params_equal_peft(bf16_model, lora):
    from peft import get_peft_model

    from qlora_cli.model.adapters.lora import build_lora_config
    from qlora_cli.model.loading import count_parameters

    section = LoraSection(**lora)
    wrapped = get_peft_model(copy.deepcopy(bf16_model), build_lora_config(section))
    trainable, _ = count_parameters(wrapped)
    plan = Plan(lora_r=section.r, target_modules=section.target_modules if isinstance(section.target_modules, str) else tuple(section.target_modules),
                use_dora=section.use_dora, modules_to_save=tuple(section.modules_to_save or ()))
    assert trainable_params(resolve(str(DEMO_MODEL)), plan) == trainable


def test_saved_activations_match_autograd_on_the_demo_model(bf16_model):
    from peft import get_peft_model

    from qlora_cli.model.adapters.lora import build_lora_config
    from qlora_cli.model.loading import prepare_for_training

    model = prepare_for_training(copy.deepcopy(bf16_model), gradient_checkpointing=False)
    wrapped = get_peft_model(model, build_lora_config(LoraSection(r=16, target_modules="all-linear", dropout=0.05)))
    wrapped.train()
    plan = Plan(lora_r=16, seq_len=64, gradient_checkpointing=False)
    arch = resolve(str(DEMO_MODEL))
    assert measured_saved_bytes(wrapped, random_batch(plan, arch.vocab_size)) == pytest.approx(expected_cpu_bytes(arch, plan), rel=0.02)
