"""Label masking per format, with exact token-level expectations on the tiny word-level
tokenizer (one word = one id), plus the data errors a user can make."""

import pytest

from qlora_cli.data.formats import IGNORE_INDEX, format_row, prompt_and_reference
from qlora_cli.data.sources import load_rows
from qlora_cli.data.splits import load_splits, tokenize_rows
from qlora_cli.errors import DataError
from qlora_cli.recipe.schema import DataSection
from tests.conftest import write_jsonl


def section(**kwargs) -> DataSection:
    kwargs.setdefault("train", "unused.jsonl")
    return DataSection(**kwargs)


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(ids)


def scored(tokenizer, ids, labels):
    return [tok for tok, label in zip(tokens(tokenizer, ids), labels) if label != IGNORE_INDEX]


def test_chat_scores_only_assistant_turns(tiny_tokenizer):
    row = {"messages": [
        {"role": "user", "content": "what topic is cat ?"},
        {"role": "assistant", "content": "music"},
        {"role": "user", "content": "and dog ?"},
        {"role": "assistant", "content": "sports"},
    ]}
    ids, labels = format_row(row, section(format="chat"), tiny_tokenizer)
    assert tokens(tiny_tokenizer, ids) == [
        "<|im_start|>", "user", "what", "topic", "is", "cat", "?", "<|im_end|>",
        "<|im_start|>", "assistant", "music", "<|im_end|>",
        "<|im_start|>", "user", "and", "dog", "?", "<|im_end|>",
        "<|im_start|>", "assistant", "sports", "<|im_end|>",
    ]
    assert scored(tiny_tokenizer, ids, labels) == ["music", "<|im_end|>", "sports", "<|im_end|>"]
    assert labels[10] == ids[10] and labels[9] == IGNORE_INDEX


def test_chat_train_on_prompt_scores_everything(tiny_tokenizer):
    row = {"messages": [{"role": "user", "content": "cat"}, {"role": "assistant", "content": "music"}]}
    ids, labels = format_row(row, section(format="chat", train_on_prompt=True), tiny_tokenizer)
    assert labels == ids


def test_alpaca_masks_the_prompt(tiny_tokenizer):
    row = {"instruction": "what topic", "input": "", "output": "music"}
    ids, labels = format_row(row, section(format="alpaca"), tiny_tokenizer)
    assert scored(tiny_tokenizer, ids, labels) == ["music", "<|im_end|>"]
    assert tokens(tiny_tokenizer, ids)[-3:] == ["Response:", "music", "<|im_end|>"]


def test_alpaca_with_input_uses_the_input_template(tiny_tokenizer):
    row = {"instruction": "what topic", "input": "cat", "output": "music"}
    prompt, reference = prompt_and_reference(row, section(format="alpaca"), tiny_tokenizer)
    assert "### Input:\ncat" in prompt and reference == "music"


def test_prompt_completion_boundary_is_exact(tiny_tokenizer):
    row = {"prompt": "what topic is dog ?", "completion": "sports"}
    ids, labels = format_row(row, section(format="prompt_completion"), tiny_tokenizer)
    assert tokens(tiny_tokenizer, ids) == ["what", "topic", "is", "dog", "?", "sports", "<|im_end|>"]
    assert labels == [IGNORE_INDEX] * 5 + ids[5:]


def test_text_scores_all_tokens(tiny_tokenizer):
    ids, labels = format_row({"text": "hello world"}, section(format="text"), tiny_tokenizer)
    assert tokens(tiny_tokenizer, ids) == ["hello", "world", "<|im_end|>"] and labels == ids


def test_custom_column_mapping(tiny_tokenizer):
    row = {"q": "what topic", "a": "music"}
    data = section(format="prompt_completion", columns={"prompt": "q", "completion": "a"})
    ids, labels = format_row(row, data, tiny_tokenizer)
    assert scored(tiny_tokenizer, ids, labels) == ["music", "<|im_end|>"]


def test_truncation_and_drop(tiny_tokenizer, tmp_path):
    import datasets

    rows = datasets.Dataset.from_list([{"text": "one two three four five six"}, {"text": "one two"}])
    truncated, stats = tokenize_rows(rows, section(format="text", max_seq_len=4), tiny_tokenizer)
    assert truncated["length"] == [4, 3] and stats.truncated == 1
    dropped, stats = tokenize_rows(rows, section(format="text", max_seq_len=4, overlong="drop"), tiny_tokenizer)
    assert dropped["length"] == [3] and stats.dropped_long == 1


def test_rows_whose_response_is_cut_off_are_dropped(tiny_tokenizer):
    import datasets

    rows = datasets.Dataset.from_list([
        {"prompt": "one two three four five six", "completion": "music"},
        {"prompt": "one", "completion": "music"},
    ])
    kept, stats = tokenize_rows(rows, section(format="prompt_completion", max_seq_len=4), tiny_tokenizer)
    assert stats.kept == 1 and stats.dropped_unscored == 1


def test_all_labels_masked_is_an_error(tiny_tokenizer):
    import datasets

    rows = datasets.Dataset.from_list([{"prompt": "one two three four five", "completion": "music"}])
    with pytest.raises(DataError, match="all its labels masked"):
        tokenize_rows(rows, section(format="prompt_completion", max_seq_len=3), tiny_tokenizer)


def test_template_without_assistant_turn_masks_everything(tiny_tokenizer):
    import datasets

    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "cat"}]}])
    with pytest.raises(DataError, match="labels masked"):
        tokenize_rows(rows, section(format="chat"), tiny_tokenizer)


def test_missing_field_names_the_row(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c"}])
    rows = load_rows(str(path))
    with pytest.raises(DataError, match=r"row 2 has no `output`"):
        tokenize_rows(rows, section(format="alpaca"), tiny_tokenizer)


def test_missing_column_suggests_mapping(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"no column `prompt`.*data.columns.prompt"):
        tokenize_rows(load_rows(str(path)), section(format="prompt_completion"), tiny_tokenizer)


def test_malformed_messages_name_the_row(tiny_tokenizer):
    import datasets

    rows = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "a"}]}, {"messages": [{"role": "user"}]}])
    with pytest.raises(DataError, match="row 2"):
        tokenize_rows(rows, section(format="chat"), tiny_tokenizer)


def test_missing_data_file(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_rows(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_file_formats_load(tmp_path, suffix):
    import datasets

    table = datasets.Dataset.from_list([{"text": "hello world"}, {"text": "cat dog"}])
    path = tmp_path / f"d{suffix}"
    {".jsonl": table.to_json, ".csv": table.to_csv, ".parquet": table.to_parquet}[suffix](str(path))
    assert load_rows(str(path))["text"] == ["hello world", "cat dog"]


def test_saved_dataset_folder_loads(tmp_path):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "cat"}])}).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(str(tmp_path / "ds"))["text"] == ["cat"]
    with pytest.raises(DataError, match="splits"):
        load_rows(str(tmp_path / "ds"), split="validation")


def test_eval_split_holds_out_rows(tiny_tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": f"cat {w}"} for w in ["one", "two", "three", "four", "five"] * 4])
    train, evaluation, train_stats, eval_stats = load_splits(section(train=str(path), format="text", eval_split=0.25), tiny_tokenizer, 0)
    assert (train_stats.kept, eval_stats.kept) == (15, 5)
