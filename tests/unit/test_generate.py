"""`qlora generate` parts on the tiny Llama: prompt and --adapter parsing, and one loaded base
with a LoRA and a bottleneck adapter answering exactly as each adapter loaded alone does."""

import pytest

from qlora_cli.errors import ConfigError, DataError
from qlora_cli.evaluate import inference
from qlora_cli.evaluate.generate import Generator, Prompt, parse_adapter_specs, parse_prompt, read_prompt_file, render
from qlora_cli.model import loading
from qlora_cli.recipe.loader import load_recipe
from tests.unit.tiny_run import make_run, method_run


def test_prompt_parsing(tmp_path):
    assert parse_prompt("topics: what is it?", ["topics", "style"]) == Prompt("topics", "what is it?")
    assert parse_prompt("base: hi", ["topics"]) == Prompt("base", "hi")
    assert parse_prompt("no name: here", ["topics"]) == Prompt("topics", "no name: here")  # one adapter: the default
    assert parse_prompt('{"adapter": "style", "prompt": "x"}', ["topics", "style"]) == Prompt("style", "x")
    with pytest.raises(DataError, match="start it with the adapter"):
        parse_prompt("hello", ["topics", "style"])
    (tmp_path / "p.txt").write_text("# comment\ntopics: a\n\nstyle: b\n")
    assert read_prompt_file(tmp_path / "p.txt", ["topics", "style"]) == [Prompt("topics", "a"), Prompt("style", "b")]


def test_adapter_options(tmp_path):
    with pytest.raises(ConfigError, match="expected NAME=DIR"):
        parse_adapter_specs(["just-a-dir"])
    with pytest.raises(ConfigError, match="at least one"):
        parse_adapter_specs([])


def test_one_base_many_adapters_answer_like_each_alone(tmp_path, tiny_model_dir):
    lora = make_run(tmp_path / "lora", tiny_model_dir)
    bottle = method_run(tmp_path / "bottle", tiny_model_dir, "bottleneck")
    recipe = load_recipe(lora)
    generator = Generator(recipe, parse_adapter_specs([f"lora={lora}", f"bottle={bottle}"]))
    prompts = [Prompt(name, text) for name in ("lora", "bottle", "base", "lora") for text in ("which topic is cat ?",)]
    answers = generator.answer(prompts, max_new_tokens=4)
    tokenizer = loading.load_tokenizer(recipe.model)

    def alone(adapter_dir):
        model = inference.load_model_as_trained(recipe, adapter_dir)
        ids = render("which topic is cat ?", recipe, tokenizer)
        return tokenizer.decode(inference.greedy_generate(model, tokenizer, [ids], 4, 1)[0], skip_special_tokens=True).strip()

    assert answers == [alone(lora), alone(bottle), alone(None), alone(lora)]
    assert len({answers[0], answers[1], answers[2]}) == 3, answers  # three different models answered
