"""Fuzzing the recipe loader through `qlora validate`: for any YAML text, any value in any field
of a valid recipe, and any --set override, the command succeeds or prints one error line with
a documented exit code, never a traceback. Fixed, derandomized example budgets keep it fast."""

import json
import os

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.recipe.loader import valid_keys
from tests.conftest import write_jsonl

runner = CliRunner()
# CI: a fixed, derandomized budget. QLORA_FUZZ_EXAMPLES=5000 explores further with fresh random examples.
EXPLORE = int(os.environ.get("QLORA_FUZZ_EXAMPLES", 0))
FUZZ = settings(max_examples=EXPLORE or 120, deadline=None, derandomize=not EXPLORE, suppress_health_check=[HealthCheck.too_slow])
USER_ERRORS = {2, 3, 4, 5}

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # surrogates cannot be written as UTF-8
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), text,
    st.sampled_from(["", "auto", "all-linear", "nf4", "chat", "~", ".nan", "-.inf", "0x10", "1e400", "/", "/dev/null", "\x00", "../..", "."]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3), max_leaves=6)


@pytest.fixture(scope="module")
def base_recipe(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    rows = [{"messages": [{"role": "user", "content": f"what topic is {w} ?"}, {"role": "assistant", "content": "music"}]} for w in ("cat", "dog", "red", "blue")]
    return folder, {
        "model": {"path": str(tiny_model_dir)},
        "quantization": {"bits": 16},
        "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(write_jsonl(folder / "train.jsonl", rows)), "format": "chat", "max_seq_len": 64},
        "train": {"max_steps": 2},
        "output": {"dir": str(folder / "run")},
    }


def check_validate(recipe_path, *args):
    result = runner.invoke(app, ["validate", str(recipe_path), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    if result.exit_code != 0:
        assert result.exit_code in USER_ERRORS, (result.exit_code, result.output)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    return result


def test_the_fuzzed_base_recipe_is_valid(base_recipe):
    folder, recipe = base_recipe
    path = folder / "base.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert check_validate(path).exit_code == 0


@FUZZ
@given(document=text | st.builds(yaml.safe_dump, values) | st.builds(lambda v: "model:\n  path: " + v, text))
def test_any_yaml_text(base_recipe, document):
    folder, _ = base_recipe
    path = folder / "any.yaml"
    path.write_text(document, encoding="utf-8")
    check_validate(path)


def _set(recipe: dict, dotted: str, value) -> dict:
    recipe = json.loads(json.dumps(recipe))
    node = recipe
    *parents, leaf = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value
    return recipe


@FUZZ
@example(key="data.train", value=[])  # found by this test: an empty list crashed the data loader
@example(key="model. \x85", value=None)  # found by this test: a line break inside a quoted key split the error line
@example(key="model.[/x]", value=1)  # a key that reads as rich markup crashed the error printer
@given(key=st.sampled_from(valid_keys()) | st.builds("{}.{}".format, st.sampled_from(["model", "lora", "data", "train"]), text), value=values)
def test_any_value_in_any_field(base_recipe, key, value):
    folder, recipe = base_recipe
    path = folder / "field.yaml"
    path.write_text(yaml.safe_dump(_set(recipe, key, value), allow_unicode=True), encoding="utf-8")
    check_validate(path)


@FUZZ
@given(assignment=st.builds("{}={}".format, st.sampled_from(valid_keys()), text) | text)
def test_any_set_override(base_recipe, assignment):
    folder, recipe = base_recipe
    path = folder / "set.yaml"
    path.write_text(yaml.safe_dump(recipe))
    check_validate(path, "--set", assignment)
