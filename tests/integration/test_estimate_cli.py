"""`qlora estimate` end to end through the Typer app: recipes and the recipe-free form, JSON and
tables, advice, one-line errors with non-zero exits, and no torch import on the estimate path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.recipe.loader import load_recipe
from tests.conftest import CONFIGS, DEMO_MODEL, ROOT

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, ["estimate", *args], env={"HF_HUB_OFFLINE": "1", "COLUMNS": "200"})


def run_json(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_validates_and_starts_with_the_schema_line(config):
    load_recipe(config)
    assert config.read_text().startswith("# yaml-language-server: $schema=../docs/recipe.schema.json")


def test_llama_8b_recipe_json_on_a_4090():
    data = run_json(str(ROOT / "configs/llama-3.1-8b-qlora.yaml"), "--gpu", "RTX4090")
    assert {"total_gib", "gpu_gib", "fits", "breakdown"} <= set(data)
    assert data["fits"] is True and data["gpu_gib"] == pytest.approx(24.0, abs=0.05)
    assert sum(data["breakdown"].values()) == pytest.approx(data["total_gib"], abs=0.05)
    assert 7 < data["total_gib"] < 12  # the chunked loss: one chunk of logits (torchtune reports 7.4 GiB for this run)
    standard = run_json(str(ROOT / "configs/llama-3.1-8b-qlora.yaml"), "--gpu", "RTX4090", "--set", "train.loss_kernel=standard")
    assert standard["breakdown"]["logits_and_loss"] > 10 * data["breakdown"]["logits_and_loss"]
    assert 10 < standard["total_gib"] < 18
    assert data["trainable_params"] == 41_943_040 and data["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert set(data["breakdown"]) == {"base_weights", "adapter_weights", "gradients", "optimizer_states", "activations",
                                      "logits_and_loss", "allocator_overhead", "cuda_context"}


def test_70b_recipe_on_a_t4_says_why_and_what_to_buy():
    result = run(str(ROOT / "configs/llama-3.3-70b-qlora-48gb.yaml"), "--gpu", "T4")
    assert result.exit_code == 0, result.output
    assert "does not fit on NVIDIA T4" in result.stdout
    assert "no recipe setting makes it fit" in result.stdout and "L40S" in result.stdout


def test_bf16_recipe_on_a_4090_lists_changes_with_their_totals():
    data = run_json(str(ROOT / "configs/qwen2.5-7b-lora-bf16.yaml"), "--gpu", "RTX4090", "--set", "train.micro_batch_size=4")
    assert data["fits"] is False
    changes = {s["change"]: s for s in data["suggestions"]}
    assert "quantization.bits=4" in changes and changes["quantization.bits=4"]["fits"]
    assert all(s["total_gib"] <= data["gpu_gib"] for s in data["suggestions"])


def test_recipe_free_form_and_overrides_reach_the_plan():
    data = run_json("--model", "Llama-3.1-8B", "--quant", "16bit", "--rank", "8", "--seq-len", "1024", "--batch", "2",
                    "--no-gradient-checkpointing", "--optimizer", "adamw_torch", "--target-modules", "q_proj,v_proj",
                    "--gpu-memory", "80GB")
    plan = data["plan"]
    assert (plan["bits"], plan["lora_r"], plan["seq_len"], plan["micro_batch"]) == (16, 8, 1024, 2)
    assert plan["gradient_checkpointing"] is False and plan["target_modules"] == ["q_proj", "v_proj"]
    assert data["gpu_gib"] == pytest.approx(80e9 / 2**30, abs=0.01)
    with_set = run_json(str(ROOT / "configs/mistral-7b-qlora.yaml"), "--set", "train.micro_batch_size=3")
    assert with_set["plan"]["micro_batch"] == 3 and with_set["fits"] is None and with_set["fits_on"]


@pytest.mark.skipif(not DEMO_MODEL.is_dir(), reason="demo model missing: run `qlora demo-model`")
def test_quickstart_reads_the_demo_model_folder():
    data = run_json(str(ROOT / "configs/quickstart.yaml"), "--gpu", "T4")
    assert data["architecture_source"].endswith("SmolLM2-135M-Instruct/config.json")
    assert data["total_params"] == 134_515_008 and data["fits"] is True


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--model", "llama-3.1-8b-instruct", "--gpu", "RTX4080"], "unknown GPU 'RTX4080'; did you mean RTX4090"),
        (["--model", "meta-llama/Llama-3.1-8B-Instrct"], "did you mean meta-llama/Llama-3.1-8B-Instruct"),
        (["--model", "mistral-7b-instruct-v0.3", "--gpu-memory", "lots"], "--gpu-memory 'lots' is not a memory size"),
        (["--model", "mistral-7b-instruct-v0.3", "--quant", "3bit"], "--quant '3bit': use 4bit, 8bit or 16bit"),
        (["--model", "mistral-7b-instruct-v0.3", "--gpu", "T4", "--gpu-memory", "16GB"], "give --gpu or --gpu-memory, not both"),
        (["--model", "mistral-7b-instruct-v0.3", "--target-modules", "q_prj"], "match no layer"),
        ([], "give a recipe"),
    ],
    ids=["unknown-card", "unknown-model", "memory", "quant", "both-cards", "targets", "nothing"],
)
def test_bad_input_is_one_line_and_non_zero(args, expected):
    result = run(*args)
    assert result.exit_code == 2
    assert expected in result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr


def test_invalid_recipe_names_the_key(tmp_path):
    recipe = tmp_path / "bad.yaml"
    text = (ROOT / "configs/mistral-7b-qlora.yaml").read_text().replace("  micro_batch_size: 1", "  batch_size: 1")
    recipe.write_text(text)
    result = run(str(recipe), "--gpu", "T4")
    assert result.exit_code == 2
    assert "unknown key `train.batch_size`; did you mean `train.micro_batch_size`?" in result.stderr


def test_measure_without_cuda_is_a_one_line_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present; tests/gpu covers --measure")
    result = run(str(ROOT / "configs/mistral-7b-qlora.yaml"), "--measure")
    assert result.exit_code == 5
    assert "--measure needs a CUDA GPU" in result.stderr and result.stderr.strip().count("\n") == 0


def test_the_estimate_path_imports_neither_torch_nor_transformers():
    code = (
        "import sys; from typer.testing import CliRunner; from qlora_cli.cli import app; "
        f"r = CliRunner().invoke(app, ['estimate', {str(ROOT / 'configs/llama-3.1-8b-qlora.yaml')!r}, '--gpu', 'RTX4090', '--json']); "
        "assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets', 'peft', 'bitsandbytes') if m in sys.modules))"
    )
    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "QLORA_OFFLINE": "1"}  # a hub id from the shipped catalog, no network
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(ROOT), timeout=60, env=offline)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
