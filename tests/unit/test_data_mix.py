"""More than one training source: a weighted mix has the weights' proportions, a take is exact,
each source keeps its own format, the mix is reported by validate, and a plain list of files is
still their rows one after another."""

from __future__ import annotations

import json

import pytest

from qlora_cli.data.splits import load_splits
from tests.conftest import invoke, one_line_error, recipe_from, write_jsonl, write_recipe


def chat(word: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": f"what topic is {word} ?"}, {"role": "assistant", "content": answer}]}


def answers(dataset, tokenizer) -> list[str]:
    """The first trained word of each tokenized row (which source it came from)."""
    return [tokenizer.convert_ids_to_tokens([i for i, label in zip(ids, labels) if label != -100])[0]
            for ids, labels in zip(dataset["input_ids"], dataset["labels"])]


def test_a_weighted_mix_of_1000_rows_has_the_weights_proportions(recipe_dict, tiny_tokenizer, tmp_path):
    music = write_jsonl(tmp_path / "music.jsonl", [chat("cat", "music")] * 450)  # fewer rows than its share: repeated
    sports = write_jsonl(tmp_path / "sports.jsonl", [{"prompt": "what topic is dog ?", "completion": "sports"}] * 550)
    recipe = recipe_from(recipe_dict, data={"train": [
        {"path": str(music), "weight": 0.7},
        {"path": str(sports), "format": "prompt_completion", "weight": 0.3},
    ]})
    train, _, stats, _ = load_splits(recipe.data, tiny_tokenizer, seed=0)
    words = answers(train, tiny_tokenizer)
    assert len(words) == 1000
    assert abs(words.count("music") / 1000 - 0.7) <= 0.03 and abs(words.count("sports") / 1000 - 0.3) <= 0.03
    assert words[:20].count("music") not in (0, 20)  # shuffled, not one source after the other
    assert [(s["used"], s["repeated"]) for s in stats.mix] == [(700, True), (300, False)]


def test_take_is_exact_and_validate_reports_the_mix(recipe_dict, tmp_path):
    music = write_jsonl(tmp_path / "music.jsonl", [chat("cat", "music")] * 40)
    sports = write_jsonl(tmp_path / "sports.jsonl", [chat("dog", "sports")] * 40)
    recipe_dict["data"]["train"] = [{"path": str(music), "weight": 1}, {"path": str(sports), "take": 5}]
    result = invoke("validate", write_recipe(tmp_path, recipe_dict), "--json")
    assert result.exit_code == 0, result.output
    mix = json.loads(result.stdout)["train"]["mix"]
    assert [(s["source"], s["used"], s["take"]) for s in mix] == [(str(music), 40, None), (str(sports), 5, 5)]
    shown = invoke("validate", write_recipe(tmp_path, recipe_dict))
    assert "train mix" in shown.stdout and "take 5" in shown.stdout


def test_a_plain_list_of_files_is_their_rows_in_order(recipe_dict, tiny_tokenizer, tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [chat("cat", "music")] * 3)
    second = write_jsonl(tmp_path / "b.jsonl", [chat("dog", "sports")] * 2)
    train, _, stats, _ = load_splits(recipe_from(recipe_dict, data={"train": [str(first), str(second)]}).data, tiny_tokenizer, 0)
    assert answers(train, tiny_tokenizer) == ["music"] * 3 + ["sports"] * 2 and stats.mix is None


@pytest.mark.parametrize("sources,expected", [
    ([{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl"}], "every source needs a weight"),
    ([{"path": "a.jsonl", "weight": 1, "take": 3}], "weight or take, not both"),
])
def test_a_mix_that_cannot_be_read_is_one_line(recipe_dict, tmp_path, sources, expected):
    recipe_dict["data"]["train"] = sources
    assert expected in one_line_error(invoke("validate", write_recipe(tmp_path, recipe_dict)), 2)


def test_a_bad_row_in_the_second_source_names_that_file(recipe_dict, tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [chat("cat", "music")] * 3)
    bad = write_jsonl(tmp_path / "bad.jsonl", [chat("dog", "sports"), {"messages": [{"role": "human", "content": "hi"}]}])
    recipe_dict["data"]["train"] = [{"path": str(good), "weight": 1}, {"path": str(bad), "weight": 1}]
    line = one_line_error(invoke("train", write_recipe(tmp_path, recipe_dict)), 3)
    assert f"{bad}: row 2 message 1: unknown role 'human'" in line
    assert not (tmp_path / "run").exists()


def test_a_dataset_repository_with_subsets_is_read_as_from_the_hub(recipe_dict, tiny_tokenizer, tmp_path):
    """The hub path (subset and split) on a local dataset repository: data files per subset, named
    in its README's `configs`, as hub datasets are laid out."""
    repo = tmp_path / "repo"
    for subset, answer in (("music", "music"), ("sports", "sports")):
        (repo / subset).mkdir(parents=True)
        write_jsonl(repo / subset / "train.jsonl", [chat("cat", answer)] * 3)
        write_jsonl(repo / subset / "test.jsonl", [chat("dog", answer)] * 2)
    configs = "".join(f"- config_name: {s}\n  data_files:\n  - split: train\n    path: {s}/train.jsonl\n  - split: test\n    path: {s}/test.jsonl\n"
                      for s in ("music", "sports"))
    (repo / "README.md").write_text(f"---\nconfigs:\n{configs}---\n")
    recipe = recipe_from(recipe_dict, data={"train": [{"path": str(repo), "subset": "sports", "split": "test"}]})
    train, _, _, _ = load_splits(recipe.data, tiny_tokenizer, 0)
    assert answers(train, tiny_tokenizer) == ["sports", "sports"]
    recipe_dict["data"]["train"] = [{"path": str(repo), "subset": "cooking"}]
    line = one_line_error(invoke("validate", write_recipe(tmp_path, recipe_dict)), 3)
    assert "cooking" in line and "music" in line  # the missing subset, and the ones there are
