"""`qlora init`: the written recipe loads, `qlora estimate` says it fits the named card, 4-bit and
shorter rows are chosen only when the card needs them, every field carries its schema comment,
and nothing is overwritten without --force. Pure arithmetic: no model is loaded."""

import json
import re

import pytest

from qlora_cli.estimate import catalog
from qlora_cli.recipe.loader import load_recipe, valid_keys
from qlora_cli.recipe.schema import Recipe
from tests.conftest import invoke


def estimate_json(recipe_path, *gpu_args):
    result = invoke("estimate", recipe_path, *gpu_args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("model, gpu, bits, checkpointing, seq_len", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "T4", 16, False, 2048),
    ("Qwen/Qwen2.5-7B-Instruct", "A100-80GB", 16, False, 2048),
    ("Llama-3.1-8B-Instruct", "RTX4090", 16, True, 2048),  # 16-bit fits only by recomputing activations
    ("mistralai/Mistral-7B-Instruct-v0.3", "T4", 4, True, 2048),  # 16-bit does not fit: 4-bit chosen
    ("Qwen/Qwen2.5-14B-Instruct", "RTX4090", 4, True, 2048),
    ("meta-llama/Llama-3.3-70B-Instruct", "A6000", 4, True, None),  # not even one row of 2048: shorter rows
])
def test_written_recipe_loads_and_fits_the_named_card(tmp_path, monkeypatch, model, gpu, bits, checkpointing, seq_len):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # catalog names need no network
    path = tmp_path / "recipe.yaml"
    result = invoke("init", "--model", model, "--gpu", gpu, "--output", path)
    assert result.exit_code == 0, result.output
    recipe = load_recipe(path)
    assert recipe.quantization.bits == bits and recipe.train.gradient_checkpointing == checkpointing
    assert recipe.model.path == catalog.find_model(model)[0] and recipe.data.format == "chat"
    if seq_len:
        assert recipe.data.max_seq_len == seq_len
    else:
        assert 256 <= recipe.data.max_seq_len < 2048 and recipe.train.micro_batch_size == 1
    verdict = estimate_json(path, "--gpu", gpu)
    assert verdict["fits"] is True and verdict["headroom_gib"] >= 0.09 * verdict["gpu_gib"]
    usable = ["--gpu-memory", f"{0.9 * verdict['gpu_gib']:.3f}GiB"]
    # The largest that fits: doubling the micro-batch (or, at one short row, full-length rows) does not.
    grown = ["--set", f"train.micro_batch_size={2 * recipe.train.micro_batch_size}"] if seq_len else ["--set", "data.max_seq_len=2048"]
    assert estimate_json(path, *usable, *grown)["fits"] is False
    # Every setting preferred to the chosen one (16-bit before 4-bit, checkpointing off before on)
    # does not fit even one row of 2048 tokens.
    preferred = [(16, False), (16, True), (4, False), (4, True)]
    for better_bits, better_checkpointing in preferred[:preferred.index((bits, checkpointing))]:
        changed = estimate_json(path, *usable, "--set", f"quantization.bits={better_bits}", "--set", "train.micro_batch_size=1",
                                "--set", f"train.gradient_checkpointing={str(better_checkpointing).lower()}", "--set", "data.max_seq_len=2048")
        assert changed["fits"] is False, (better_bits, better_checkpointing)


def test_every_field_is_written_under_its_schema_description(tmp_path):
    path = tmp_path / "recipe.yaml"
    assert invoke("init", "--model", "Qwen3-8B", "--gpu", "H100", "--task", "instruct", "--output", path).exit_code == 0
    lines = path.read_text().splitlines()
    assert lines[0].startswith("# yaml-language-server: $schema=") and (path.parent / lines[0].split("=", 1)[1]).resolve().name == "recipe.schema.json"
    written = []
    stack: list[str] = []
    for index, line in enumerate(lines):
        match = re.match(r"^( *)([a-z_]+):", line)
        if not match:
            continue
        depth = len(match.group(1)) // 2
        stack = stack[:depth] + [match.group(2)]
        key = ".".join(stack)
        written.append(key)
        comment = []
        for previous in reversed(lines[:index]):
            if not previous.strip().startswith("#"):
                break
            comment.insert(0, previous.strip().lstrip("# "))
        field = _field(key)
        assert field.description and " ".join(comment).startswith(field.description.split(";")[0][:40]), key
    recipe = load_recipe(path)
    # Every key, but the sections only other adapter methods and other objectives read (as recipe_to_yaml writes it).
    from qlora_cli.recipe.adapter_section import method_sections_to_drop
    from qlora_cli.recipe.objective_section import sections_to_drop

    top, unused = method_sections_to_drop(recipe)
    dropped = tuple(top) + tuple(sections_to_drop(recipe)) + tuple(f"adapter.{name}" for name in unused)
    assert written == [key for key in valid_keys() if not any(key == d or key.startswith(d + ".") for d in dropped)]
    assert "adapter.bottleneck" not in written and "lora.r" in written
    assert recipe.data.format == "alpaca" and recipe.output.dir == "runs/qwen3-8b-instruct"


def _field(dotted: str):
    model = Recipe
    *sections, leaf = dotted.split(".")
    for name in sections:
        model = model.model_fields[name].annotation
    return model.model_fields[leaf]


def test_a_model_folder_is_read_through_its_config_json(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(catalog.MODELS["meta-llama/Llama-3.1-8B-Instruct"]))
    path = tmp_path / "recipe.yaml"
    result = invoke("init", "--model", folder, "--gpu", "T4", "--task", "text", "--output", path)
    assert result.exit_code == 0, result.output
    recipe = load_recipe(path)
    assert recipe.model.path == str(folder) and recipe.data.format == "text" and recipe.quantization.bits == 4
    assert estimate_json(path, "--gpu", "T4")["fits"] is True


def test_an_existing_file_is_kept_unless_forced(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("mine\n")
    result = invoke("init", "--model", "Qwen3-8B", "--gpu", "H100", "--output", path)
    assert result.exit_code == 5 and "already exists; pass --force" in result.stderr
    assert path.read_text() == "mine\n"
    assert invoke("init", "--model", "Qwen3-8B", "--gpu", "H100", "--output", path, "--force").exit_code == 0
    assert load_recipe(path).model.path == "Qwen/Qwen3-8B"


@pytest.mark.parametrize("args, code, expected", [
    (["--model", "meta-llama/Llama-3.1-405B", "--gpu", "T4"], 5, "does not fit on NVIDIA T4 16 GB even as 4-bit"),
    (["--model", "Qwen3-8B", "--gpu", "RTX9090"], 2, "unknown GPU 'RTX9090'"),
    (["--model", "Qwen3-8B", "--gpu", "T4", "--task", "poetry"], 2, "--task 'poetry'"),
    (["--model", "Qwen3-8B"], 2, "give --gpu NAME"),
    (["--model", "./no/such/folder", "--gpu", "T4"], 2, "does not exist"),
])
def test_mistakes_are_one_line_and_write_nothing(tmp_path, args, code, expected):
    path = tmp_path / "recipe.yaml"
    result = invoke("init", *args, "--output", path)
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not path.exists()
