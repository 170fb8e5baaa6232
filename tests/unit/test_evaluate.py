"""qlora evaluate on the tiny Llama: the loss is the token-weighted cross-entropy of exactly the
response tokens (checked against a hand computation), batched left-padded greedy decoding
equals decoding one prompt at a time, and matches are counted from the generations."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from qlora_cli.cli import app
from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.evaluate import inference
from qlora_cli.evaluate.scores import exact_match, normalize_answer, normalized_match, parse_compare, resolve_target, run_evaluation
from qlora_cli.model import loading
from qlora_cli.model.quantized import replace_4bit_layers
from tests.unit.tiny_run import PAIRS, chat_rows, make_run


@pytest.fixture
def run16(tmp_path, tiny_model_dir):
    return make_run(tmp_path / "run", tiny_model_dir, bits=16)


def hand_loss(model, tokenizer, pairs, train_on_prompt=False):
    """Sum of -log p over the scored tokens, and their count, one unpadded row at a time."""
    total, count = 0.0, 0
    for row in chat_rows(pairs):
        messages = row["messages"]
        prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]
        prompt_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert tokenizer.convert_ids_to_tokens(ids[prompt_length - 2:prompt_length]) == ["<|im_start|>", "assistant"]
        first_scored = 1 if train_on_prompt else prompt_length  # the answer words and <|im_end|>
        with torch.no_grad():
            log_probs = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        for position in range(first_scored, len(ids)):
            total -= float(log_probs[position - 1, ids[position]])
            count += 1
    return total, count


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_loss_is_token_weighted_cross_entropy_of_the_scored_tokens(tmp_path, tiny_model_dir, tiny_tokenizer, train_on_prompt):
    run = make_run(tmp_path / "run", tiny_model_dir, data={"train_on_prompt": train_on_prompt})
    recipe, _ = resolve_target(run)
    report = run_evaluation(recipe, None, ["base"], batch_size=3, show_progress=False)
    base = loading.load_base_model(recipe).eval()
    total, count = hand_loss(base, tiny_tokenizer, PAIRS, train_on_prompt)
    scores = report["models"]["base"]
    assert scores["scored_tokens"] == count
    assert scores["loss"] == pytest.approx(total / count, abs=1e-5)
    assert scores["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-6)
    if not train_on_prompt:
        # Answers of 1, 2 and 3 words: the mean over rows of per-row means is a different number.
        assert count == sum(len(answer.split()) + 1 for _, answer in PAIRS)
        per_row = [hand_loss(base, tiny_tokenizer, [pair]) for pair in PAIRS]
        assert abs(sum(t / c for t, c in per_row) / len(per_row) - total / count) > 1e-4


def test_batched_greedy_decoding_equals_one_prompt_at_a_time(tiny_model_dir, tiny_tokenizer):
    model = loading.load_base_model(tiny_recipe(tiny_model_dir)).eval()
    prompts = [
        tiny_tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        for text in ["cat", "which topic is the red dog about ?", "hello world", "one two three four five six seven eight"]
    ]
    ids = [inference.prompt_ids(prompt, "chat", tiny_tokenizer) for prompt in prompts]
    batched = inference.greedy_generate(model, tiny_tokenizer, ids, max_new_tokens=6, batch_size=4)
    for row, generated in zip(ids, batched):
        sequence, expected = list(row), []
        for _ in range(6):
            with torch.no_grad():
                token = int(model(torch.tensor([sequence])).logits[0, -1].argmax())
            if token == tiny_tokenizer.eos_token_id:
                break
            expected.append(token)
            sequence.append(token)
        assert generated == expected


def tiny_recipe(model_dir, bits=16):
    from qlora_cli.recipe.loader import validate_recipe

    return validate_recipe({
        "model": {"path": str(model_dir), "dtype": "float32"}, "quantization": {"bits": bits},
        "data": {"train": "unused.jsonl", "format": "chat"}, "output": {"dir": "unused"},
    })


def test_match_rules():
    assert exact_match(" music\n", "music") and not exact_match("Music", "music")
    assert normalize_answer("  The   Music!! ") == "the music"
    assert normalized_match("Music.", "music") and normalized_match("rock-n-roll", "rocknroll")
    assert not normalized_match("music fan", "music")


def test_exact_and_normalised_match_are_counted_from_the_generations(tmp_path, tiny_model_dir, tiny_tokenizer):
    # References built from the model's own greedy answers: 2 verbatim, 1 differing only in case
    # and punctuation, 1 wrong, so the expected rates are known exactly.
    words = ["cat", "dog", "red", "blue"]
    recipe = tiny_recipe(tiny_model_dir)
    model = loading.load_base_model(recipe).eval()
    prompts = [
        inference.prompt_ids(tiny_tokenizer.apply_chat_template([{"role": "user", "content": f"which topic is {w} ?"}], tokenize=False, add_generation_prompt=True), "chat", tiny_tokenizer)
        for w in words
    ]
    answers = [tiny_tokenizer.decode(ids, skip_special_tokens=True) for ids in inference.greedy_generate(model, tiny_tokenizer, prompts, 4, 4)]
    assert all(answers)
    references = [answers[0], answers[1], answers[2].upper() + " !", "definitely not generated"]
    run = make_run(tmp_path / "run", tiny_model_dir, eval_rows=chat_rows(list(zip(words, references))))
    recipe, _ = resolve_target(run)
    report = run_evaluation(recipe, None, ["base"], max_new_tokens=4, show_progress=False)
    assert report["models"]["base"]["exact_match"] == 0.5
    assert report["models"]["base"]["normalized_match"] == 0.75
    assert [example["base"] for example in report["examples"]] == answers


def test_base_comes_from_the_same_model_with_the_adapter_disabled(run16):
    recipe, adapter_dir = resolve_target(run16)
    both = run_evaluation(recipe, adapter_dir, ["base", "adapter"], max_new_tokens=3, show_progress=False)
    alone = run_evaluation(recipe, None, ["base"], max_new_tokens=3, show_progress=False)
    assert both["models"]["base"]["loss"] == pytest.approx(alone["models"]["base"]["loss"], abs=1e-6)
    assert abs(both["models"]["adapter"]["loss"] - both["models"]["base"]["loss"]) > 1e-3


def test_cpu_inference_on_dequantized_layers_equals_bitsandbytes(tiny_model_dir):
    model = loading.load_base_model(tiny_recipe(tiny_model_dir, bits=4)).eval()
    ids = torch.tensor([[3, 4, 7, 9, 11, 2, 3, 5]])
    with torch.no_grad():
        expected = model(ids).logits
        assert replace_4bit_layers(model) == 2 * 7
        actual = model(ids).logits
    assert torch.equal(expected, actual)


def test_compare_option():
    assert parse_compare("adapter,base", None) == ["base", "adapter"]
    assert parse_compare("base", "merged-dir") == ["base", "merged"]
    with pytest.raises(ConfigError, match="--merged DIR"):
        parse_compare("base,merged", None)
    with pytest.raises(ConfigError, match="choose from"):
        parse_compare("base,lora", None)


def test_targets_a_run_directory_or_a_recipe_file(run16, tmp_path):
    recipe, adapter_dir = resolve_target(run16, data_file=tmp_path / "other.jsonl")
    assert adapter_dir == run16 and recipe.data.eval == str(tmp_path / "other.jsonl")
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text((run16 / "recipe.yaml").read_text())
    recipe, adapter_dir = resolve_target(recipe_file, [f"output.dir={tmp_path / 'elsewhere'}"])
    assert adapter_dir == tmp_path / "elsewhere"


def test_missing_adapter_is_a_model_error(tmp_path, tiny_model_dir):
    run = make_run(tmp_path / "run", tiny_model_dir)
    (run / "adapter_config.json").unlink()
    recipe, adapter_dir = resolve_target(run)
    with pytest.raises(ModelError, match="adapter_config.json missing"):
        run_evaluation(recipe, adapter_dir, ["base", "adapter"], show_progress=False)


def test_cli_writes_eval_json(run16, tmp_path):
    output = tmp_path / "out" / "eval.json"
    result = CliRunner().invoke(app, ["evaluate", str(run16), "--max-samples", "3", "--max-new-tokens", "2", "--output", str(output), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert json.loads(output.read_text()) == printed
    assert set(printed["models"]) == {"base", "adapter"} and printed["rows"] == 3 and len(printed["examples"]) == 3
    bad = CliRunner().invoke(app, ["evaluate", str(run16), "--compare", "merged"])
    assert bad.exit_code == 2
