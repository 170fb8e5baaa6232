"""Recipe parsing: defaults, overrides, and a one-line error for every kind of mistake."""

import textwrap

import pytest

from qlora_cli.errors import ConfigError
from qlora_cli.recipe.loader import load_recipe, recipe_to_yaml, suggest_key, valid_keys
from qlora_cli.recipe.schema import Recipe, recipe_schema
from tests.conftest import CONFIGS

MINIMAL = """\
model:
  path: some/model
data:
  train: data.jsonl
  format: alpaca
output:
  dir: runs/x
"""


def write(tmp_path, text, name="recipe.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(tmp_path, text, overrides=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_recipe(write(tmp_path, text), overrides)
    message = str(info.value)
    assert "\n" not in message, "errors must be one line"
    return message


def test_minimal_recipe_gets_documented_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    assert recipe.quantization.bits == 4 and recipe.quantization.quant_type == "nf4"
    assert recipe.quantization.double_quant is True
    assert recipe.lora.target_modules == "all-linear"
    assert recipe.data.train_on_prompt is False
    assert recipe.model.trust_remote_code is False
    assert recipe.train.optimizer == "paged_adamw_8bit"


def test_recipe_is_frozen(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL))
    with pytest.raises(Exception):
        recipe.lora.r = 8


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)


def test_overrides_apply_with_yaml_typed_values(tmp_path):
    recipe = load_recipe(
        write(tmp_path, MINIMAL),
        ["train.learning_rate=1e-4", "lora.r=8", "lora.target_modules=[q_proj, v_proj]", "quantization.bits=16"],
    )
    assert recipe.train.learning_rate == pytest.approx(1e-4)
    assert recipe.lora.r == 8
    assert recipe.lora.target_modules == ["q_proj", "v_proj"]
    assert recipe.quantization.bits == 16


def test_resolved_recipe_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), ["lora.r=4"])
    again = load_recipe(write(tmp_path, recipe_to_yaml(recipe), "resolved.yaml"))
    assert again == recipe


def test_run_directory_loads_its_recipe(tmp_path):
    (tmp_path / "run").mkdir()
    write(tmp_path / "run", MINIMAL)
    assert load_recipe(tmp_path / "run").model.path == "some/model"


def test_yaml_syntax_error_names_line(tmp_path):
    message = error_of(tmp_path, "model:\n  path: x\n  dtype: [unclosed\ndata:\n")
    assert "YAML syntax error" in message and "line" in message


def test_unknown_key_names_key_line_and_suggestion(tmp_path):
    text = MINIMAL + "lora:\n  r: 8\n  target_module: [q_proj]\n"
    message = error_of(tmp_path, text)
    assert "unknown key `lora.target_module`" in message
    assert "line 10" in message
    assert "did you mean `lora.target_modules`?" in message


@pytest.mark.parametrize(
    "bad, expected",
    [("lora.rank", "lora.r"), ("train.lr", "train.learning_rate"), ("train.batch_size", "train.micro_batch_size"), ("lora.lora_alpha", "lora.alpha")],
)
def test_aliases_from_other_tools_are_suggested(bad, expected):
    assert suggest_key(bad) == expected


def test_misspelt_section(tmp_path):
    message = error_of(tmp_path, MINIMAL + "trian:\n  max_steps: 3\n")
    assert "unknown key `trian`" in message and "did you mean `train`?" in message


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("lora.r=0", "`lora.r`"),
        ("lora.r=-3", "`lora.r`"),
        ("lora.dropout=1.0", "`lora.dropout`"),
        ("lora.dropout=-0.1", "`lora.dropout`"),
        ("quantization.bits=3", "`quantization.bits` must be one of"),
        ("train.optimizer=sgd", "`train.optimizer` must be one of"),
        ("lora.r=abc", "`lora.r`"),
        ("data.format=sharegpt", "`data.format` must be one of"),
        ("lora.target_modules=[]", "`lora.target_modules`"),
    ],
)
def test_wrong_types_and_ranges(tmp_path, override, fragment):
    message = error_of(tmp_path, MINIMAL, [override])
    assert fragment in message


def test_missing_required_key(tmp_path):
    message = error_of(tmp_path, "model:\n  path: x\noutput:\n  dir: y\n")
    assert "missing required key `data`" in message


def test_missing_recipe_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_empty_or_non_mapping_recipe(tmp_path, text):
    error_of(tmp_path, text)


def test_bad_override_syntax(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["train.learning_rate"])
    assert "section.key=value" in message


def test_unknown_override_key_is_rejected_with_suggestion(tmp_path):
    message = error_of(tmp_path, MINIMAL, ["train.learning_rat=1e-4"])
    assert "did you mean `train.learning_rate`?" in message


def test_schema_documents_every_field():
    schema = recipe_schema()
    assert "model" in schema["properties"]
    for definition in schema["$defs"].values():
        for name, prop in definition.get("properties", {}).items():
            assert prop.get("description"), f"{name} has no description"
    assert "lora.target_modules" in valid_keys()
