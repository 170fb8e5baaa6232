"""The shipped tool-calling recipe on the demo model's tokenizer: `qlora validate --show` trains
every assistant turn of data/tools/train.jsonl (the tool calls among them) with its <|im_end|>,
and the demo model's own template, which renders no tools, is refused in one line."""

import json

import pytest

from tests.integration.conftest import qlora

pytestmark = pytest.mark.integration


def test_tool_calls_and_answers_are_trained_with_their_end_of_turn():
    result = qlora("validate", "configs/tool-calling.yaml", "--show", 3, "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["train"]["rows"] == report["train"]["kept"] == 10
    first = report["rows"][0]
    trained = [span["text"] for span in first["spans"] if span["trained"]]
    assert trained == [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call><|im_end|>\n',
        "It is 18 °C and cloudy in Paris.<|im_end|>\n",
        "64 °F.<|im_end|>\n",
    ]
    untrained = "".join(span["text"] for span in first["spans"] if not span["trained"])
    assert "You are a concise travel assistant." in untrained and '"name": "convert_currency"' in untrained  # system column, tools
    assert '<tool_response>\n{"city": "Paris"' in untrained  # the tool result is read, not trained


def test_the_demo_models_own_template_cannot_render_the_tool_calls():
    result = qlora("validate", "configs/tool-calling.yaml", "--set", "model.chat_template=null")
    assert result.returncode == 3 and "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert "data.train data/tools/train.jsonl: row 1: the chat template rejected this conversation" in line and "set model.chat_template" in line
