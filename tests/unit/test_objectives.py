"""Objectives beyond SFT on the tiny Llama: the preference / unpaired / prompt-only formats mask
exactly the responses, each bad row or reward is one line naming it, DPO's loss falls and the adapter
ends up preferring `chosen` (kill / resume and DDP: test_objectives_processes.py)."""

import json
import typing

import pytest

from qlora_cli.data import preference
from qlora_cli.errors import ConfigError
from qlora_cli.evaluate import rewards
from qlora_cli.recipe import objective_section
from qlora_cli.recipe.schema import TrainSection
from qlora_cli.train.objectives import OBJECTIVES
from qlora_cli.train.run import run_training
from tests.conftest import invoke, losses, one_line_error, recipe_from, write_jsonl, write_recipe

PAIRS = [("cat", "music", "sports"), ("dog", "sports", "music"), ("red", "weather", "cooking"), ("blue", "cooking", "weather")]


def pair_rows(chat: bool = True) -> list[dict]:
    if chat:
        return [{"prompt": [{"role": "user", "content": f"what topic is {w} ?"}], "chosen": [{"role": "assistant", "content": good}],
                 "rejected": [{"role": "assistant", "content": bad}]} for w, good, bad in PAIRS * 4]
    return [{"prompt": f"what topic is {w} ?", "chosen": good, "rejected": bad} for w, good, bad in PAIRS * 4]


@pytest.fixture
def dpo_dict(recipe_dict, tmp_path):
    recipe_dict["data"] = {"train": str(write_jsonl(tmp_path / "pairs.jsonl", pair_rows())), "format": "preference", "max_seq_len": 64}
    recipe_dict["train"].update(objective="dpo", learning_rate=2e-2, max_steps=8, save_steps=100, logging_steps=1, warmup_steps=0)
    return recipe_dict


def test_every_objective_the_schema_names_is_registered_with_its_formats():
    assert set(typing.get_args(TrainSection.model_fields["objective"].annotation)) == set(OBJECTIVES)
    assert set(objective_section.OBJECTIVE_FORMATS) == set(OBJECTIVES)
    assert set(preference.FORMATS) == {f for formats in objective_section.OBJECTIVE_FORMATS.values() for f in formats} - set(
        objective_section.OBJECTIVE_FORMATS["sft"])


def test_a_chat_pair_scores_exactly_the_assistant_turns(dpo_dict, tiny_tokenizer):
    data = recipe_from(dpo_dict).data
    row = preference.preference_row(pair_rows()[0], data, tiny_tokenizer, 1, "data.train")
    prompt = tiny_tokenizer.decode(row["prompt_ids"])
    assert prompt.endswith("<|im_start|> assistant") and "music" not in prompt
    assert tiny_tokenizer.decode(row["chosen_ids"]) == "music <|im_end|>"
    assert tiny_tokenizer.decode(row["rejected_ids"]) == "sports <|im_end|>"


def test_a_text_pair_ends_each_response_with_eos(dpo_dict, tiny_tokenizer):
    data = recipe_from(dpo_dict).data
    row = preference.preference_row(pair_rows(chat=False)[0], data, tiny_tokenizer, 1, "data.train")
    assert row["chosen_ids"][-1] == row["rejected_ids"][-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(row["chosen_ids"][:-1]) == "music"


@pytest.mark.parametrize("row, says", [
    ({"prompt": "what topic is cat ?", "chosen": "music"}, "no column `rejected`"),
    ({"prompt": "what topic is cat ?", "chosen": "music", "rejected": "music"}, "row 2: `chosen` and `rejected` are identical"),
    ({"prompt": "what topic is cat ?", "chosen": "", "rejected": "music"}, "row 2 has no `chosen`"),
    ({"prompt": "what " * 70, "chosen": "music", "rejected": "sports"}, "row 2: the prompt alone is"),
])
def test_a_bad_pair_is_one_line_naming_its_row(dpo_dict, tmp_path, row, says):
    rows = [{"prompt": "what topic is dog ?", "chosen": "sports", "rejected": "music"}, row]
    if "rejected" not in row:
        rows = [row, row]
    dpo_dict["data"]["train"] = str(write_jsonl(tmp_path / "bad.jsonl", rows))
    line = one_line_error(invoke("validate", write_recipe(tmp_path, dpo_dict)), 3)  # a data error
    assert says in line


def test_objective_and_format_that_disagree_are_refused_in_one_line(dpo_dict, tmp_path):
    dpo_dict["train"]["objective"] = "sft"
    line = one_line_error(invoke("validate", write_recipe(tmp_path, dpo_dict)), 2)
    assert "data.format preference is for objective dpo" in line


def test_validate_names_the_objective_and_counts_pair_tokens(dpo_dict, tmp_path):
    result = invoke("validate", write_recipe(tmp_path, dpo_dict), "--json")
    summary = json.loads(result.output)
    assert summary["objective"] == "dpo beta=0.1 loss=sigmoid"
    assert summary["train"]["kept"] == 16 and summary["train"]["scored_tokens"] == 16 * 4  # 2 tokens per response


def test_builtin_rewards_score_what_they_say():
    completions = ["Music!", " music", "the topic is music and more words here"]
    references = {"reference": ["music"] * 3}
    assert rewards.exact_match_reward([], completions, **references) == [0.0, 1.0, 0.0]
    assert rewards.normalized_match_reward([], completions, **references) == [1.0, 1.0, 0.0]
    assert rewards.regex_match_reward([], completions, pattern=r"\bmusic\b") == [0.0, 1.0, 1.0]
    assert rewards.format_reward([], completions, pattern=r"[a-z]+") == [0.0, 1.0, 0.0]
    assert rewards.length_penalty_reward([], completions, target_tokens=2) == [1.0, 1.0, 0.25]
    assert rewards.length_penalty_reward([], ["", " \n"], target_tokens=2) == [0.0, 0.0]  # stopping at once is no answer


@pytest.fixture
def grpo_dict(recipe_dict, tmp_path):
    rows = [{"prompt": [{"role": "user", "content": f"what topic is {w} ?"}], "reference": good} for w, good, _ in PAIRS * 4]
    recipe_dict["data"] = {"train": str(write_jsonl(tmp_path / "prompts.jsonl", rows)), "format": "prompt_only", "max_seq_len": 64}
    recipe_dict["train"].update(objective="grpo", micro_batch_size=4)
    recipe_dict["grpo"] = {"num_generations": 4, "max_completion_len": 4, "rewards": [{"function": "normalized_match"}]}
    return recipe_dict


@pytest.mark.parametrize("source, function, says", [
    (None, "no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("def other(prompts, completions, **kw):\n    return [1.0] * len(completions)\n", "f", "has no function 'f'"),
    ("def f(prompts, completions, **kw):\n    return 1.0\n", "f", "must return a list with one float per completion"),
    ("def f(prompts, completions, **kw):\n    return [1.0]\n", "f", "got a list of 1"),
    ("def f(prompts, completions, reference, **kw):\n    return [r.missing for r in reference]\n", "f", "failed on a dry call"),
])
def test_a_broken_user_reward_is_one_line_before_any_model_loads(grpo_dict, tmp_path, monkeypatch, source, function, says):
    spec = function
    if source is not None:
        (tmp_path / "my_rewards.py").write_text(source)
        spec = f"{tmp_path / 'my_rewards.py'}:{function}"
    grpo_dict["grpo"]["rewards"] = [{"function": spec}]
    monkeypatch.setattr("qlora_cli.model.loading.load_base_model", lambda *a, **k: pytest.fail("loaded a model"))
    for command in ("validate", "train"):
        line = one_line_error(invoke(command, write_recipe(tmp_path, grpo_dict)), 2)
        assert line.startswith("error: grpo.rewards[0]:") and says in line, line


def test_a_user_reward_is_called_with_the_rows_columns(grpo_dict, tmp_path):
    (tmp_path / "my_rewards.py").write_text("def f(prompts, completions, reference, **kw):\n    return [float(r == 'music') for r in reference]\n")
    recipe = recipe_from(grpo_dict, grpo={"rewards": [{"function": f"{tmp_path / 'my_rewards.py'}:f", "weight": 2.0}]})
    functions = rewards.checked_rewards(recipe, [{"prompt": "p", "reference": "music"}])
    scores = rewards.score_completions(functions, recipe, ["p", "p"], ["a", "b"], {"reference": ["music", "sports"]})
    assert scores == {"mean_reward": 1.0, "rewards": {f"{tmp_path / 'my_rewards.py'}:f": 0.5}}


def test_a_grpo_reward_without_its_setting_is_refused(grpo_dict):
    with pytest.raises(ConfigError, match=r"grpo.rewards\[0\]: reward regex_match needs a `pattern`"):
        recipe_from(grpo_dict, grpo={"rewards": [{"function": "regex_match"}]})


def test_dpo_lowers_its_loss_and_the_adapter_prefers_chosen(dpo_dict):
    result = run_training(recipe_from(dpo_dict), show_progress=False)
    curve = losses(result.output_dir)
    assert curve[1] == pytest.approx(0.6931, abs=1e-3)  # log 2: the adapter starts as the reference
    assert curve[8] < 0.5 * curve[1]
    history = json.loads((result.output_dir / "metrics.json").read_text())["log_history"]
    assert history[-2]["rewards/accuracies"] == 1.0 and history[-2]["rewards/margins"] > 0
    assert (result.output_dir / "loss.png").is_file() and not (result.output_dir / "ref").exists()
    assert result.metrics["tokens_seen"] == 8 * 4 * 2 * 12  # 8 steps x 4 pairs x 2 sequences x 12 tokens



def test_dpo_after_sft_uses_the_sft_adapter_as_its_frozen_reference(recipe_dict, dpo_dict, tmp_path):
    sft = run_training(recipe_from(recipe_dict, train={"max_steps": 3, "learning_rate": 3e-2}, output={"dir": str(tmp_path / "sft")}),
                       show_progress=False)
    recipe = recipe_from(dpo_dict, model={"init_adapter": str(sft.output_dir)}, train={"max_steps": 2}, output={"dir": str(tmp_path / "dpo")})
    result = run_training(recipe, show_progress=False)
    # The policy starts equal to its reference, so the first loss is log 2: the reference is base + the SFT
    # adapter (were it the base alone, the SFT adapter's changes would show as a non-zero margin).
    assert losses(result.output_dir)[1] == pytest.approx(0.6931, abs=1e-4)
    assert not (result.output_dir / "ref").exists()  # the run saves the trained adapter only


def test_grpo_trains_on_its_rewards_and_evaluate_scores_them(grpo_dict):
    grpo_dict["train"].update(max_steps=2, learning_rate=1e-2, save_steps=100)
    grpo_dict["data"]["eval_split"] = 0.25
    result = run_training(recipe_from(grpo_dict, grpo={"beta": 0.05}), show_progress=False)
    history = json.loads((result.output_dir / "metrics.json").read_text())["log_history"]
    assert all("rewards/normalized_match/mean" in entry and "kl" in entry for entry in history if "loss" in entry)
    assert result.metrics["tokens_seen"] > 2 * 4 * 10  # prompts (10 tokens each) and their completions, counted once generated
    assert (result.output_dir / "objective.png").is_file()
    report = json.loads(invoke("evaluate", result.output_dir, "--json").output.splitlines()[-1])
    assert set(report["models"]) == {"base", "adapter"} and report["rows"] == 4
    assert set(report["models"]["adapter"]["rewards"]) == {"normalized_match"} and "exact_match" in report["models"]["adapter"]
