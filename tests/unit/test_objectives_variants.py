"""KTO, ORPO and SimPO on the tiny Llama (16-bit base): each trains, its loss falls, and the adapter it
saves loads and prefers the right answers; each objective's own mistakes are one line and a non-zero
exit (DPO and GRPO: test_objectives.py)."""

import json

import pytest

from qlora_cli.data import preference
from qlora_cli.evaluate import inference
from qlora_cli.evaluate.preference import pair_scores, scored_sequences, sequence_logps
from qlora_cli.model import adapters, loading
from qlora_cli.train.run import run_training
from tests.conftest import invoke, losses, one_line_error, recipe_from, write_jsonl, write_recipe
from tests.unit.test_objectives import PAIRS, dpo_dict, pair_rows  # noqa: F401  (fixture)


def unpaired_rows() -> list[dict]:
    """Each prompt once with its right topic (desirable) and once with a wrong one (undesirable)."""
    rows = []
    for word, good, bad in PAIRS * 2:
        prompt = [{"role": "user", "content": f"what topic is {word} ?"}]
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": good}], "label": True})
        rows.append({"prompt": prompt, "completion": [{"role": "assistant", "content": bad}], "label": False})
    return rows


@pytest.fixture
def kto_dict(dpo_dict, tmp_path):  # noqa: F811
    kto = json.loads(json.dumps(dpo_dict))
    kto["data"] = {"train": str(write_jsonl(tmp_path / "unpaired.jsonl", unpaired_rows())), "format": "unpaired_preference",
                   "max_seq_len": 64}
    kto["train"].update(objective="kto", max_steps=12)
    return kto


def test_kto_lowers_its_loss_and_the_saved_adapter_prefers_the_desirable_answers(kto_dict, dpo_dict):  # noqa: F811
    result = run_training(recipe_from(kto_dict), show_progress=False)
    curve = losses(result.output_dir)
    assert curve[1] == pytest.approx(0.5, abs=0.02)  # 1 - sigmoid(0): the adapter starts as the reference
    # KTO's loss is noisy step to step (its KL term is a batch estimate): the last four steps against the first four.
    assert sum(curve[step] for step in range(9, 13)) < 0.75 * sum(curve[step] for step in range(1, 5))
    history = json.loads((result.output_dir / "metrics.json").read_text())["log_history"]
    assert all("kl" in entry for entry in history if "loss" in entry)
    # The saved adapter, loaded back as `qlora evaluate` loads it, scores the right topic above the wrong
    # one on every prompt, by a wider margin than the base does.
    recipe = recipe_from(dpo_dict)  # the same model, reading pairs
    tokenizer = loading.load_tokenizer(recipe.model)
    pairs = [preference.preference_row(row, recipe.data, tokenizer, number, "pairs") for number, row in enumerate(pair_rows()[:4], 2)]
    model = inference.load_model_as_trained(recipe, result.output_dir)
    sequences = scored_sequences(pairs)
    adapter = pair_scores(sequence_logps(model, sequences, tokenizer.pad_token_id, 8))
    with adapters.only_base(model):
        base = pair_scores(sequence_logps(model, sequences, tokenizer.pad_token_id, 8))
    assert adapter["reward_accuracy"] == 1.0 and adapter["mean_margin"] > base["mean_margin"] + 1.0


@pytest.mark.parametrize("settings, objective", [({}, "orpo"), ({"preference": {"loss_type": "simpo"}}, "dpo")], ids=["orpo", "simpo"])
def test_orpo_and_simpo_lower_their_loss_and_evaluate_scores_the_saved_adapter(dpo_dict, tmp_path, settings, objective):  # noqa: F811
    recipe = recipe_from(dpo_dict, train={"objective": objective}, **settings)
    result = run_training(recipe, show_progress=False)
    curve = losses(result.output_dir)
    assert curve[8] < 0.6 * curve[1]
    history = [entry for entry in json.loads((result.output_dir / "metrics.json").read_text())["log_history"] if "loss" in entry]
    assert history[-1]["rewards/margins"] > history[0]["rewards/margins"] and history[-1]["rewards/accuracies"] == 1.0
    assert (result.output_dir / "objective.png").is_file() and not (result.output_dir / "ref").exists()
    held_out = write_jsonl(tmp_path / "held_out.jsonl", pair_rows())
    report = json.loads(invoke("evaluate", result.output_dir, "--data", held_out, "--json").output.splitlines()[-1])
    assert report["objective"] == objective
    assert report["models"]["adapter"]["reward_accuracy"] == 1.0
    assert report["models"]["adapter"]["mean_margin"] > report["models"]["base"]["mean_margin"]


@pytest.mark.parametrize("change, code, says", [
    ({"rows": [{"prompt": "what topic is cat ?", "completion": "music", "label": "yes"}]}, 3,
     "row 2: `label` must be true (desirable) or false (undesirable), not 'yes'"),
    ({"rows": [{"prompt": "what topic is cat ?", "completion": "music"}]}, 3, "row 2 has no `label`; every unpaired_preference row needs it"),
    ({"train": {"micro_batch_size": 1}}, 2, "objective kto estimates its KL term from the other rows of a micro-batch"),
    ({"data": {"format": "preference"}}, 2, "data.format preference is for objective dpo, not kto"),
    ({"grpo": {"rewards": [{"function": "exact_match"}]}}, 2, "the recipe gives `grpo` settings but train.objective is kto"),
], ids=["label", "no-label", "micro-batch", "format", "section"])
def test_a_kto_mistake_is_one_line(kto_dict, tmp_path, change, code, says):
    if "rows" in change:
        rows = [{"prompt": "what topic is dog ?", "completion": "sports", "label": True}, *change["rows"]]
        kto_dict["data"]["train"] = str(write_jsonl(tmp_path / "bad.jsonl", rows))
    for section, values in change.items():
        if section != "rows":
            kto_dict.setdefault(section, {}).update(values)
    assert says in one_line_error(invoke("validate", write_recipe(tmp_path, kto_dict)), code)


@pytest.mark.parametrize("objective, preference_settings, says", [
    ("orpo", {"loss_type": "ipo"}, "preference.loss_type applies to objective dpo, not orpo"),
    ("dpo", {"loss_type": "simpo", "precompute_ref_log_probs": True}, "preference.loss_type simpo is reference-free; drop preference.precompute_ref_log_probs"),
    ("orpo", {"loss_type": "dpo"}, "preference.loss_type"),
], ids=["orpo-loss-type", "simpo-precompute", "unknown-loss-type"])
def test_an_orpo_or_simpo_mistake_is_one_line(dpo_dict, tmp_path, objective, preference_settings, says):  # noqa: F811
    dpo_dict["train"]["objective"] = objective
    dpo_dict["preference"] = preference_settings
    assert says in one_line_error(invoke("validate", write_recipe(tmp_path, dpo_dict)), 2)


def test_an_orpo_pair_with_identical_answers_is_one_line_naming_its_row(dpo_dict, tmp_path):  # noqa: F811
    rows = [{"prompt": "what topic is dog ?", "chosen": "sports", "rejected": "music"}, {"prompt": "what topic is cat ?", "chosen": "music", "rejected": "music"}]
    dpo_dict["data"]["train"] = str(write_jsonl(tmp_path / "bad.jsonl", rows))
    dpo_dict["train"]["objective"] = "orpo"
    assert "row 2: `chosen` and `rejected` are identical" in one_line_error(invoke("train", write_recipe(tmp_path, dpo_dict)), 3)
