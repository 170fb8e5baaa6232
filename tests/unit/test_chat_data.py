"""Chat data as people write it, on the tiny word-level tokenizer (one id per word, so trained
text is exact): every assistant turn trained or only the last, each with its end-of-turn token;
templates that would never teach the model to stop, or drop tool calls, are errors; tool calls,
tool results, a tools column and per-row system prompts go through the template; and
`qlora validate --show` shows what is trained."""

from __future__ import annotations

import json

import pytest

from qlora_cli.data.formats import IGNORE_INDEX, format_row
from qlora_cli.errors import DataError
from qlora_cli.recipe.schema import DataSection
from tests.conftest import invoke, one_line_error, write_jsonl, write_recipe

CONVERSATION = [
    {"role": "user", "content": "what topic is cat ?"},
    {"role": "assistant", "content": "music"},
    {"role": "user", "content": "and dog ?"},
    {"role": "assistant", "content": "sports"},
]
# ChatML with tools, as Qwen-style templates render them (tools listed in a system turn, tool
# results in a user turn).
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<|im_start|>system ' }}{% for tool in tools %}{{ tool['function']['name'] + ' ' }}{% endfor %}{{ '<|im_end|> ' }}{% endif %}"
    "{% for message in messages %}{{ '<|im_start|>' + ('user' if message['role'] == 'tool' else message['role']) + ' ' }}"
    "{% if message.get('content') %}{{ message['content'] + ' ' }}{% endif %}"
    "{% for call in message.get('tool_calls', []) %}{{ call['function']['name'] + ' ' + call['function']['arguments']['city'] + ' ' }}{% endfor %}"
    "{{ '<|im_end|> ' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant ' }}{% endif %}"
)


def section(**fields) -> DataSection:
    return DataSection(**{"train": "unused.jsonl", "format": "chat", **fields})


def trained_text(tokenizer, ids, labels) -> str:
    return " ".join(tokenizer.convert_ids_to_tokens([i for i, label in zip(ids, labels) if label != IGNORE_INDEX]))


def test_every_assistant_turn_is_trained_with_its_end_of_turn(tiny_tokenizer):
    ids, labels = format_row({"messages": CONVERSATION}, section(), tiny_tokenizer)
    assert trained_text(tiny_tokenizer, ids, labels) == "music <|im_end|> sports <|im_end|>"
    ids, labels = format_row({"messages": CONVERSATION}, section(train_on="last_assistant"), tiny_tokenizer)
    assert trained_text(tiny_tokenizer, ids, labels) == "sports <|im_end|>"


def test_a_template_that_never_ends_a_turn_with_a_special_token_is_an_error(tiny_tokenizer):
    endless = tiny_tokenizer.chat_template.replace(" <|im_end|> ", " . ")
    saved, tiny_tokenizer.chat_template = tiny_tokenizer.chat_template, endless
    try:
        with pytest.raises(DataError, match=r"row 1 message 2: the chat template ends an assistant turn with no special token"):
            format_row({"messages": CONVERSATION}, section(), tiny_tokenizer)
    finally:
        tiny_tokenizer.chat_template = saved


def tool_row() -> dict:
    return {
        "system": "the weather is a topic",
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        "messages": [
            {"role": "user", "content": "what is the weather in red ?"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "weather", "arguments": {"city": "red"}}}]},
            {"role": "tool", "content": "blue"},
            {"role": "assistant", "content": "blue"},
        ],
    }


def test_tool_calls_tool_results_tools_and_system_go_through_the_template(tiny_tokenizer):
    saved, tiny_tokenizer.chat_template = tiny_tokenizer.chat_template, TOOLS_TEMPLATE
    try:
        ids, labels = format_row(tool_row(), section(), tiny_tokenizer)
    finally:
        tiny_tokenizer.chat_template = saved
    text = " ".join(tiny_tokenizer.convert_ids_to_tokens(ids))
    assert text.startswith("<|im_start|> system weather <|im_end|> <|im_start|> system the weather is a topic <|im_end|>")
    assert "weather red <|im_end|> <|im_start|> user blue <|im_end|>" in text  # the tool result, not trained
    assert trained_text(tiny_tokenizer, ids, labels) == "weather red <|im_end|> blue <|im_end|>"


def test_a_template_without_tools_is_an_error_that_says_what_to_do(tiny_tokenizer):
    with pytest.raises(DataError, match=r"row 1: the chat template rejected this conversation: .* set model.chat_template to a template with tools"):
        format_row(tool_row(), section(), tiny_tokenizer)  # ChatML without tools: a message without content
    silent = tiny_tokenizer.chat_template.replace("message['content']", "message.get('content', '')")
    saved, tiny_tokenizer.chat_template = tiny_tokenizer.chat_template, silent
    try:
        with pytest.raises(DataError, match=r"row 1 message 2: the chat template does not render tool calls"):
            format_row(tool_row(), section(), tiny_tokenizer)  # renders, but the tool call is dropped
    finally:
        tiny_tokenizer.chat_template = saved


# ---- through the command line: one line, non-zero exit, no traceback, nothing written ---------

ROW = {"messages": [{"role": "user", "content": "what topic is cat ?"}, {"role": "assistant", "content": "music"}]}
GOOD = json.dumps(ROW) + "\n"


def broken_files():
    latin = json.dumps({"messages": [{"role": "user", "content": "caf\u00e9"}, {"role": "assistant", "content": "music"}]}, ensure_ascii=False)
    typo = {"messages": [{"role": "user", "content": "cat"}, {"role": "asistant", "content": "music"}]}
    return {
        "empty": (b"", "is empty"),
        "latin1": ((GOOD * 2).encode() + latin.encode("latin-1") + b"\n", "is not UTF-8: byte 0xE9 at offset "),
        "utf16": ((GOOD * 2).encode("utf-16"), "is UTF-16 text"),
        "malformed": ((GOOD * 3 + '{"messages": [\n' + GOOD).encode(), "line 4: not valid JSON"),
        "role": ((GOOD * 3 + json.dumps(typo) + "\n").encode(), "row 4 message 2: unknown role 'asistant'; did you mean 'assistant'?"),
    }


@pytest.mark.parametrize("case", list(broken_files()))
def test_broken_data_is_one_line_before_the_model_loads(case, recipe_dict, tmp_path):
    content, expected = broken_files()[case]
    data = tmp_path / "train.jsonl"
    data.write_bytes(content)
    recipe_dict["data"]["train"] = str(data)
    result = invoke("train", write_recipe(tmp_path, recipe_dict))
    line = one_line_error(result, 3)
    assert str(data) in line and expected in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name,content", [
    ("bom.jsonl", b"\xef\xbb\xbf" + GOOD.encode() * 4),  # UTF-8 with a byte-order mark
    ("array.jsonl", json.dumps([ROW] * 4).encode()),  # a JSON array under .jsonl
    ("lines.json", GOOD.encode() * 4),  # JSON Lines under .json
    ("array.json", json.dumps([ROW] * 4, indent=2).encode()),
])
def test_utf8_bom_and_json_arrays_or_lines_are_read_whatever_the_extension(name, content, recipe_dict, tmp_path):
    (tmp_path / name).write_bytes(content)
    recipe_dict["data"]["train"] = str(tmp_path / name)
    result = invoke("validate", write_recipe(tmp_path, recipe_dict), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train"]["kept"] == 4


def test_answers_cut_by_max_seq_len_are_counted_and_an_error_when_most_are(recipe_dict, tmp_path):
    long_prompt = {"role": "user", "content": " ".join(["cat"] * 20)}
    rows = [{"messages": [long_prompt, {"role": "assistant", "content": "music"}]}] * 3 + [ROW] * 5
    recipe_dict["data"].update(train=str(write_jsonl(tmp_path / "t.jsonl", rows)), max_seq_len=16)
    counted = invoke("validate", write_recipe(tmp_path, recipe_dict), "--json")
    assert counted.exit_code == 0 and json.loads(counted.stdout)["train"]["answers_cut_by_max_seq_len"] == 3
    recipe_dict["data"]["train"] = str(write_jsonl(tmp_path / "t.jsonl", rows[:3] + [ROW]))
    line = one_line_error(invoke("validate", write_recipe(tmp_path, recipe_dict)), 3)
    assert "3 of 4 rows lose the end of their answer to data.max_seq_len=16" in line


def test_validate_show_gives_the_trained_spans(recipe_dict, tmp_path):
    recipe_dict["data"]["train"] = str(write_jsonl(tmp_path / "t.jsonl", [{"messages": CONVERSATION}]))
    result = invoke("validate", write_recipe(tmp_path, recipe_dict), "--show", 1, "--json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.stdout)["rows"]
    trained = [span["text"] for span in row["spans"] if span["trained"]]
    assert trained == ["music <|im_end|>", "sports <|im_end|>"] and row["trained"] == 4
    assert row["tokens"] == len(row["spans"][0]["text"].split()) + sum(len(s["text"].split()) for s in row["spans"][1:])
    shown = invoke("validate", write_recipe(tmp_path, recipe_dict), "--show", 1)
    assert "row 1: 4 of" in shown.stdout and "⟦music <|im_end|>⟧" in shown.stdout
