"""`qlora generate` on the demo model: two LoRA adapters trained on different tiny tasks (each
answers every question with its own fixed word) on one loaded base, each prompt answered by the
adapter it names, in one process."""

import json

import pytest

from tests.conftest import write_jsonl
from tests.integration.conftest import qlora

pytestmark = pytest.mark.integration

QUESTIONS = ["What is the weather like?", "Name a colour.", "How are you today?", "What should I cook?",
             "Tell me a number.", "Which sport is best?", "Say something nice.", "What time is it?"]
TINY_TASK = [
    "--set", "quantization.bits=16", "--set", "data.eval=null", "--set", "lora.r=8", "--set", "lora.dropout=0",
    "--set", "train.max_steps=6", "--set", "train.learning_rate=5e-3", "--set", "train.warmup_steps=0",
    "--set", "train.micro_batch_size=4", "--set", "train.logging_steps=4", "--set", "train.save_steps=100",
]


def train_fixed_answer(tmp_path, name, answer):
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer}]} for q in QUESTIONS]
    data = write_jsonl(tmp_path / f"{name}.jsonl", rows)
    out = tmp_path / name
    result = qlora("train", "configs/quickstart.yaml", *TINY_TASK, "--set", f"data.train={data}", "--set", f"output.dir={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_two_adapters_answer_their_own_task_in_one_process(tmp_path):
    fruit = train_fixed_answer(tmp_path, "fruit", "Banana")
    animal = train_fixed_answer(tmp_path, "animal", "Giraffe")
    prompt = "Give me one word."  # not a training question
    result = qlora(
        "generate", "--base", fruit, "--adapter", f"fruit={fruit}", "--adapter", f"animal={animal}",
        f"animal: {prompt}", f"fruit: {prompt}", f"base: {prompt}", f"animal: {QUESTIONS[0]}",
        "--max-new-tokens", "4", "--json",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answers = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [a["adapter"] for a in answers] == ["animal", "fruit", "base", "animal"]
    assert answers[0]["answer"].startswith("Giraffe") and answers[3]["answer"].startswith("Giraffe")
    assert answers[1]["answer"].startswith("Banana")
    assert not answers[2]["answer"].startswith(("Banana", "Giraffe"))


def test_generate_refuses_bad_adapter_options_before_loading(tmp_path):
    reserved = qlora("generate", "--base", "configs/quickstart.yaml", "--adapter", f"base={tmp_path}", "x")
    assert reserved.returncode == 2 and "reserved for the bare base model" in reserved.stderr
    missing = qlora("generate", "--base", "configs/quickstart.yaml", "--adapter", f"a={tmp_path}", "x")
    assert missing.returncode == 4 and "no adapter in" in missing.stderr
