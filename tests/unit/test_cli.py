"""The command line turns every user mistake into one line on stderr and a documented exit
code, before anything is loaded or written."""

import json

from qlora_cli.merge import fold
from tests.conftest import invoke, one_line_error, write_jsonl, write_recipe


def test_help_lists_commands():
    result = invoke("--help")
    assert result.exit_code == 0
    for command in ("train", "validate", "demo-model", "schema"):
        assert command in result.output


def test_validate_prints_a_data_summary(tmp_path, recipe_dict):
    result = invoke("validate", write_recipe(tmp_path, recipe_dict), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["train"]["rows"] == 16 and summary["train"]["scored_tokens"] == 32  # topic + <|im_end|> per row
    assert summary["adapter"] == "lora r=4 alpha=8 dropout=0 targets=all-linear"


def test_validate_names_the_adapter_method_it_will_train(tmp_path, recipe_dict):
    recipe = {k: v for k, v in recipe_dict.items() if k != "lora"}
    recipe["adapter"] = {"method": "bottleneck", "bottleneck": {"size": 8}, "layers_to_transform": [1]}
    summary = json.loads(invoke("validate", write_recipe(tmp_path, recipe), "--json").stdout)
    assert summary["adapter"] == "bottleneck size=8 placement=['attention', 'mlp'] activation=relu layers=[1]"


def test_yaml_syntax_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  path: [oops\n")
    assert "line" in one_line_error(invoke("validate", path), 2)


def test_unknown_key(tmp_path, recipe_dict):
    recipe_dict["lora"]["rank"] = 8
    line = one_line_error(invoke("validate", write_recipe(tmp_path, recipe_dict)), 2)
    assert "`lora.rank`" in line and "did you mean `lora.r`?" in line


def test_set_override_is_validated(tmp_path, recipe_dict):
    line = one_line_error(invoke("validate", write_recipe(tmp_path, recipe_dict), "--set", "lora.dropout=1.5"), 2)
    assert "lora.dropout" in line


def test_missing_model_folder(tmp_path, recipe_dict):
    recipe_dict["model"]["path"] = str(tmp_path / "no-such-model")
    assert "does not exist" in one_line_error(invoke("train", write_recipe(tmp_path, recipe_dict)), 2)


def test_missing_data_file(tmp_path, recipe_dict):
    recipe_dict["data"]["train"] = str(tmp_path / "missing.jsonl")
    assert "not found" in one_line_error(invoke("train", write_recipe(tmp_path, recipe_dict)), 3)


def test_row_missing_a_field_names_the_row(tmp_path, recipe_dict):
    write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "cat", "completion": "music"}, {"prompt": "dog"}])
    recipe_dict["data"].update(train=str(tmp_path / "rows.jsonl"), format="prompt_completion")
    assert "row 2" in one_line_error(invoke("validate", write_recipe(tmp_path, recipe_dict)), 3)


def test_chat_template_that_masks_every_label(tmp_path, recipe_dict):
    write_jsonl(tmp_path / "rows.jsonl", [{"messages": [{"role": "user", "content": "cat"}]}])
    recipe_dict["data"]["train"] = str(tmp_path / "rows.jsonl")
    assert "labels masked" in one_line_error(invoke("validate", write_recipe(tmp_path, recipe_dict)), 3)


def test_output_dir_in_the_way_is_refused_before_loading(tmp_path, recipe_dict):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    line = one_line_error(invoke("train", write_recipe(tmp_path, recipe_dict)), 5)
    assert "--force" in line and (out / "keep.txt").exists()


def test_resume_and_force_together(tmp_path, recipe_dict):
    one_line_error(invoke("train", write_recipe(tmp_path, recipe_dict), "--resume", "--force"), 2)


def test_nproc_relaunches_the_same_command_through_torchrun(tmp_path, recipe_dict, monkeypatch):
    from qlora_cli.train import distributed

    launched = []
    monkeypatch.setattr(distributed, "relaunch", lambda nproc, argv: launched.append((nproc, argv)) or 0)
    recipe = write_recipe(tmp_path, recipe_dict)
    result = invoke("--debug", "train", recipe, "--nproc", "2", "--set", "train.max_steps=3")
    assert result.exit_code == 0, result.output
    assert launched == [(2, ["--debug", "train", str(recipe), "--set=train.max_steps=3"])]
    assert not (tmp_path / "run").exists(), "the parent only checks; the ranks write"


def test_debug_shows_the_traceback(tmp_path):
    result = invoke("--debug", "validate", tmp_path / "nope.yaml")
    assert result.exit_code != 0 and result.exception is not None


def test_schema_is_json_and_checked_in():
    from pathlib import Path

    result = invoke("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    shipped = Path(__file__).resolve().parents[2] / "docs" / "recipe.schema.json"
    assert json.loads(shipped.read_text()) == schema, "regenerate: qlora schema > docs/recipe.schema.json"


def test_merge_names_which_verification_failed(tmp_path, monkeypatch):

    def merged_with(failures, gguf_failures):
        result = fold.MergeResult(tmp_path / "out", {"verification": None}, failures, gguf_failures)
        monkeypatch.setattr(fold, "run_merge", lambda *args, **kwargs: result)
        return one_line_error(invoke("merge", tmp_path, "--output", tmp_path / "out", "--json"), 6)

    line = merged_with([], ["GGUF top-1 agreement with the merged model 90.00% < 95%"])
    assert "the GGUF file does not reproduce the merged model: GGUF top-1" in line
    line = merged_with(["top-1 agreement 80.00% < 90.0%"], ["the GGUF chat template differs from the run's"])
    assert "the merged model drifts from base + adapter: top-1 agreement 80.00% < 90.0%; the GGUF chat template differs" in line
