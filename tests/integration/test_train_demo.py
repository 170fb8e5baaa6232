"""`qlora train` end to end on the real demo model (SmolLM2-135M, NF4 base) on CPU."""

import json

import pytest
import torch

from tests.conftest import DEMO_MODEL
from tests.integration.conftest import QUICK, qlora

pytestmark = pytest.mark.integration


def test_quickstart_trains_and_the_loss_falls(demo_run):
    metrics = json.loads((demo_run / "metrics.json").read_text())
    assert metrics["global_step"] == 4
    assert metrics["last_loss"] < 0.8 * metrics["first_loss"]
    assert metrics["tokens_seen"] > 0 and metrics["eval_loss"] is not None
    assert metrics["trainable_params"] == 4_884_480  # r=16 on all 7 linears of 30 layers


def test_adapter_loads_with_peft_and_changes_logits(demo_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((demo_run / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 32)
    assert {name.rpartition(".")[2] for name in config["target_modules"]} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }
    tokenizer = AutoTokenizer.from_pretrained(demo_run)
    base = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32)
    ids = tokenizer("Which topic is this sentence about? The band played.", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, demo_run)(ids).logits
    assert (after - before).abs().max() > 1e-2


def test_run_directory_holds_the_resolved_recipe(demo_run):
    from qlora_cli.recipe.loader import load_recipe

    recipe = load_recipe(demo_run)
    assert recipe.train.max_steps == 4 and recipe.data.max_rows == 32 and recipe.quantization.bits == 4


def test_second_run_into_the_same_directory_is_refused(demo_run):
    result = qlora("train", "configs/quickstart.yaml", *QUICK, "--set", f"output.dir={demo_run}")
    assert result.returncode == 5 and "not empty" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
