"""data.streaming: a streamed run trains train.max_steps with the loss falling, a weighted stream
keeps the weights' proportions, --resume goes on where the stream stopped, validate reports a
sample (and says so), and what a stream cannot do is one line before anything is written."""

from __future__ import annotations

import json
from itertools import islice

import pytest
import torch
from safetensors.torch import load_file

from qlora_cli.data.splits import load_splits
from qlora_cli.data.streaming import SAMPLE_ROWS, train_stream
from qlora_cli.errors import DataError
from qlora_cli.train.run import run_training
from tests.conftest import invoke, losses, one_line_error, recipe_from, write_jsonl, write_recipe

WORDS = "cat dog red blue green hello world one two three four five six seven eight nine ten".split()
TOPICS = ["music", "sports", "weather", "cooking", "technology"]


def chat(word: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": f"what topic is {word} ?"}, {"role": "assistant", "content": answer}]}


def distinct_rows(count: int) -> list[dict]:
    """Rows that differ one from the next (so which rows a step trained on shows in the weights)."""
    return [chat(f"{WORDS[i % len(WORDS)]} {WORDS[(i // len(WORDS)) % len(WORDS)]}", TOPICS[i % len(TOPICS)]) for i in range(count)]


def streamed(recipe_dict: dict, **train) -> dict:
    recipe_dict["data"]["streaming"] = True
    recipe_dict["train"].update({"learning_rate": 2e-2, "save_steps": 100, **train})
    return recipe_dict


def test_a_streamed_run_trains_max_steps_and_the_loss_falls(recipe_dict, tmp_path):
    # 16 rows, 4 per step: 6 steps read the stream once and then again from its start.
    streamed(recipe_dict, max_steps=6)
    recipe_dict["data"]["eval"] = recipe_dict["data"]["train"]
    result = run_training(recipe_from(recipe_dict), show_progress=False)
    curve = losses(result.output_dir)
    assert max(curve) == 6 and curve[6] < 0.8 * curve[1], curve
    assert result.info["train_rows"] == "streamed (statistics of the first 1,000 rows)"
    assert result.metrics["eval_loss"] is not None
    assert (result.output_dir / "adapter_model.safetensors").is_file()


def test_a_weighted_stream_of_1000_rows_has_the_weights_proportions(recipe_dict, tiny_tokenizer, tmp_path):
    music = write_jsonl(tmp_path / "music.jsonl", [chat("cat", "music")] * 450)  # fewer rows than its share: read again
    sports = write_jsonl(tmp_path / "sports.jsonl", [{"prompt": "what topic is dog ?", "completion": "sports"}] * 550)
    recipe = recipe_from(streamed(recipe_dict), data={"train": [
        {"path": str(music), "weight": 0.7},
        {"path": str(sports), "format": "prompt_completion", "weight": 0.3},
    ]})
    stream, _, stats, _ = load_splits(recipe.data, tiny_tokenizer, seed=0)
    sources = [row["source"] for row in islice(stream, 1000)]
    assert len(sources) == 1000
    assert abs(sources.count(0) / 1000 - 0.7) <= 0.03 and abs(sources.count(1) / 1000 - 0.3) <= 0.03, sources.count(0)
    assert sources[:20].count(0) not in (0, 20)  # interleaved, not one source after the other
    # validate's mix is what the stream yields first.
    assert [(s["used"], s["share"]) for s in stats.mix] == [(sources.count(0), sources.count(0) / 1000), (sources.count(1), sources.count(1) / 1000)]


def test_resume_goes_on_with_the_rows_after_the_checkpoint(recipe_dict, tmp_path):
    """Stopped after 2 steps and resumed to 4, the adapter is the one 4 uninterrupted steps give: the
    resumed run skipped the 8 rows it had trained on (reading the stream from its start, it would not be)."""
    rows = write_jsonl(tmp_path / "rows.jsonl", distinct_rows(16))
    recipe_dict["data"].update(train=str(rows), packing=False)  # padded batches (the packed ones: the test above)
    streamed(recipe_dict, max_steps=4, save_steps=2, lr_scheduler="constant", warmup_steps=0)
    straight = write_recipe(tmp_path, {**recipe_dict, "output": {"dir": str(tmp_path / "straight")}}, "straight.yaml")
    assert invoke("train", straight).exit_code == 0
    resumed = tmp_path / "resumed"
    assert invoke("train", write_recipe(tmp_path, recipe_dict), "--set", "train.max_steps=2", "--set", f"output.dir={resumed}").exit_code == 0
    result = invoke("train", resumed, "--resume", "--set", "train.max_steps=4")
    assert result.exit_code == 0, result.output
    assert json.loads((resumed / "metrics.json").read_text())["global_step"] == 4
    weights = [load_file(folder / "adapter_model.safetensors") for folder in (tmp_path / "straight", resumed)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(weights[1][name], tensor)
    # Without data.eval, evaluation decodes from the first rows of the stream.
    evaluated = invoke("evaluate", resumed, "--json", "--max-samples", 3, "--max-new-tokens", 1)
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.stdout)
    assert report["rows"] == 3 and report["held_out"] is False and report["models"]["adapter"]["loss"] < report["models"]["base"]["loss"]


@pytest.mark.parametrize("change,expected", [
    ({"train": {"max_steps": None}}, "data.streaming needs train.max_steps: a stream has no length to count epochs by"),
    ({"data": {"eval_split": 0.1}}, "data.eval_split cannot hold rows out of a stream"),
    ({"data": {"train": [{"path": "a.jsonl", "weight": 1}, {"path": "b.jsonl", "take": 3}]}}, "give each source a weight, not a take"),
])
def test_what_a_stream_cannot_do_is_one_line_and_writes_nothing(recipe_dict, tmp_path, change, expected):
    streamed(recipe_dict, max_steps=2)
    for section, values in change.items():
        recipe_dict[section].update(values)
    recipe_dict["train"] = {k: v for k, v in recipe_dict["train"].items() if v is not None}
    line = one_line_error(invoke("train", write_recipe(tmp_path, recipe_dict)), 2)
    assert expected in line
    assert not (tmp_path / "run").exists()


def test_validate_on_a_streamed_recipe_reports_a_sample(recipe_dict, tmp_path):
    rows = write_jsonl(tmp_path / "big.jsonl", distinct_rows(SAMPLE_ROWS + 200))
    recipe_dict["data"]["train"] = str(rows)
    recipe = write_recipe(tmp_path, streamed(recipe_dict))
    result = invoke("validate", recipe, "--json", "--show", 2)
    assert result.exit_code == 0, result.output
    train = json.loads(result.stdout)["train"]
    assert train["rows"] == SAMPLE_ROWS and train["sample"].startswith("first 1,000 rows")
    assert len(json.loads(result.stdout)["rows"]) == 2
    shown = invoke("validate", recipe)
    assert "train data (a sample of the stream)" in shown.stdout and "first 1,000 rows" in shown.stdout


def test_a_bad_row_is_named_in_the_sample_before_anything_is_written_and_past_it_while_streaming(recipe_dict, tiny_tokenizer, tmp_path):
    rows = distinct_rows(SAMPLE_ROWS + 10)
    rows[4]["messages"][1]["role"] = "asistant"
    bad = write_jsonl(tmp_path / "bad.jsonl", rows)
    recipe_dict["data"]["train"] = str(bad)
    line = one_line_error(invoke("train", write_recipe(tmp_path, streamed(recipe_dict))), 3)
    assert f"data.train {bad}: row 5 message 2: unknown role 'asistant'; did you mean 'assistant'?" in line
    assert not (tmp_path / "run").exists()

    rows[4]["messages"][1]["role"] = "assistant"
    late = write_jsonl(tmp_path / "late.jsonl", rows[:SAMPLE_ROWS + 5] + ["not an object"])
    recipe = recipe_from(recipe_dict, data={"train": str(late)})
    with pytest.raises(DataError, match=rf"data.train: {late} line {SAMPLE_ROWS + 6}: a row must be a JSON object, not str"):
        list(train_stream(recipe.data, tiny_tokenizer, 0))


def test_every_kind_of_source_streams_and_a_bad_encoding_is_one_line(recipe_dict, tmp_path):
    """csv, parquet, a JSON array, a saved dataset folder and a dataset repository with a subset (the
    hub's code path) are read through datasets' streaming readers; a .jsonl line by line, its encoding
    checked as it goes."""
    import datasets

    rows = datasets.Dataset.from_list([{"prompt": f"what topic is {word} ?", "completion": "music"} for word in WORDS[:6]])
    rows.to_csv(tmp_path / "rows.csv")
    rows.to_parquet(tmp_path / "rows.parquet")
    rows.to_json(tmp_path / "rows.json", lines=False)
    rows.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "repo" / "en").mkdir(parents=True)
    rows.to_json(tmp_path / "repo" / "en" / "train.jsonl")
    (tmp_path / "repo" / "README.md").write_text("---\nconfigs:\n- config_name: en\n  data_files:\n  - split: train\n    path: en/train.jsonl\n---\n")
    recipe_dict["data"].update(format="prompt_completion")
    sources = [str(tmp_path / name) for name in ("rows.csv", "rows.parquet", "rows.json", "saved")] + [{"path": str(tmp_path / "repo"), "subset": "en"}]
    recipe_dict["data"]["train"] = sources
    result = invoke("validate", write_recipe(tmp_path, streamed(recipe_dict)), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train"]["rows"] == 5 * 6

    latin = tmp_path / "latin.jsonl"
    latin.write_bytes(b'{"prompt": "what topic is cat ?", "completion": "music"}\n{"prompt": "caf\xe9", "completion": "music"}\n')
    recipe_dict["data"]["train"] = str(latin)
    line = one_line_error(invoke("train", write_recipe(tmp_path, recipe_dict)), 3)
    offset = latin.read_bytes().index(b"\xe9")
    assert f"{latin} is not UTF-8: byte 0xE9 at offset {offset} (line 2) cannot be decoded (it looks like Latin-1 / Windows-1252)" in line
    assert not (tmp_path / "run").exists()


def test_a_stream_over_several_processes_is_one_line_before_they_start(recipe_dict, tmp_path):
    line = one_line_error(invoke("train", write_recipe(tmp_path, streamed(recipe_dict)), "--nproc", 2), 2)
    assert "data.streaming trains in one process; drop --nproc" in line
    assert not (tmp_path / "run").exists()
