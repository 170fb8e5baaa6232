"""Every family we claim, on a tiny random-weight model of it (tests/families.py): `qlora train`
lowers the loss on a 4-bit and on a 16-bit base, `qlora evaluate` scores the adapter (both), `qlora
merge` writes a checkpoint its verification accepts (the 4-bit run), and the estimate's trainable
count is the count the trained adapter has. A family transformers cannot train is one line before any weight loads."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_cli.estimate import resolve
from qlora_cli.estimate.memory import trainable_params
from qlora_cli.estimate.plan import plan_from_recipe
from qlora_cli.model import families, kernels
from qlora_cli.train.run import run_training
from tests.conftest import invoke, losses, one_line_error, recipe_from, write_jsonl, write_recipe
from tests.families import FAMILIES, MOE_FAMILIES, build_family, family_config, save_family
from tests.unit.tiny_run import chat_rows

STEPS = 4


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    """{family: saved tiny model folder}, written on first use."""
    from tests.conftest import build_tiny_tokenizer

    root, tokenizer, made = tmp_path_factory.mktemp("families"), build_tiny_tokenizer(), {}

    def folder(name):
        if name not in made:
            made[name] = save_family(name, root / name, tokenizer)
        return made[name]

    return folder


def family_recipe(model_dir, tmp_path, bits: int, dropout: float = 0.05) -> dict:
    rows = write_jsonl(tmp_path / "rows.jsonl", chat_rows())
    return {
        "model": {"path": str(model_dir)},  # attention: auto, dtype: auto (fp32 on these CPUs)
        "quantization": {"bits": bits},
        "lora": {"r": 4, "alpha": 8, "dropout": dropout, "target_modules": "all-linear"},  # the defaults people run
        "data": {"train": str(rows), "eval": str(rows), "format": "chat", "max_seq_len": 32},
        "train": {"max_steps": STEPS, "micro_batch_size": 8, "logging_steps": 1, "save_steps": 100, "learning_rate": 2e-2,
                  "optimizer": "adamw_torch"},
        "output": {"dir": str(tmp_path / "run")},
    }


@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_4bit_evaluates_merges_and_is_estimated(name, family_dirs, tmp_path):
    recipe = recipe_from(family_recipe(family_dirs(name), tmp_path, bits=4))
    result = run_training(recipe, show_progress=False)
    curve = losses(result.output_dir)
    assert curve[STEPS] < 0.8 * curve[1], curve
    info = result.info
    assert info["quantization"] == "4-bit nf4"
    assert info["attention"] == ("eager" if name == "gemma2" else "sdpa")  # auto: what the family supports
    assert info["loss_kernel"].startswith("chunked")  # Gemma 2's soft-capping included
    if name in MOE_FAMILIES:  # the all-linear decision, printed at start-up
        assert "routed experts and the router of each layer stay frozen" in info["targets"]
    if name == "gemma3_multimodal":  # Gemma3ForConditionalGeneration: its language model is trained, on text rows
        assert "the vision tower and the projector stay frozen" in info["targets"]

    # The estimate counts what peft trained (the adapter the run saved).
    assert trainable_params(resolve(str(family_dirs(name))), plan_from_recipe(recipe)) == info["trainable_params"]

    evaluated = invoke("evaluate", result.output_dir, "--json", "--max-samples", 4, "--max-new-tokens", 1)
    assert evaluated.exit_code == 0, evaluated.output
    scores = json.loads(evaluated.stdout)["models"]
    assert scores["adapter"]["loss"] < scores["base"]["loss"]

    merged = invoke("merge", result.output_dir, "--output", tmp_path / "merged", "--dtype", "fp32", "--base", "dequantized", "--verify-samples", 2, "--json")
    assert merged.exit_code == 0, merged.output
    check = json.loads(merged.stdout)["verification"]["merge_exactness"]
    assert check["top1_agreement"] == 1.0, check


@pytest.mark.parametrize("name", FAMILIES)
def test_family_trains_16bit_and_evaluates(name, family_dirs, tmp_path):
    """On a 16-bit base too; merging is checked once per family, on the 4-bit run above (the
    16-bit merge folds the same adapter into plain weights: nothing the 4-bit one does not show)."""
    result = run_training(recipe_from(family_recipe(family_dirs(name), tmp_path, bits=16)), show_progress=False)
    curve = losses(result.output_dir)
    assert curve[STEPS] < 0.8 * curve[1], curve
    assert result.info["quantization"] == "16-bit"
    evaluated = invoke("evaluate", result.output_dir, "--json", "--max-samples", 4, "--max-new-tokens", 1)
    assert evaluated.exit_code == 0, evaluated.output
    scores = json.loads(evaluated.stdout)["models"]
    assert scores["adapter"]["loss"] < scores["base"]["loss"]


def test_gemma2_chunked_loss_keeps_the_soft_capping(tiny_tokenizer):
    """The chunked kernel's loss and gradients equal Gemma 2's own (soft-capped) loss."""
    model = build_family("gemma2", len(tiny_tokenizer)).float()
    ids = torch.randint(3, len(tiny_tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    hidden = model.model(ids).last_hidden_state.detach().requires_grad_(True)
    own = torch.nn.functional.cross_entropy(
        model.lm_head(hidden)[:, :-1].reshape(-1, model.config.vocab_size).div(30.0).tanh().mul(30.0),
        labels[:, 1:].reshape(-1), ignore_index=-100, reduction="sum",
    )
    reference_grad = torch.autograd.grad(own, hidden)[0]
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)
    chunked = kernels.linear_cross_entropy_sum(hidden.reshape(-1, 64), model.lm_head.weight, shifted, chunk=5, softcap=kernels.softcap_of(model))
    chunked_grad = torch.autograd.grad(chunked, hidden)[0]
    torch.testing.assert_close(chunked, own, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(chunked_grad, reference_grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():  # and the model itself soft-caps as we assume
        assert model(ids).logits.abs().max() < 30.0


def test_moe_all_linear_leaves_experts_and_router_frozen(tiny_tokenizer):
    model = build_family("qwen2_moe", len(tiny_tokenizer))
    targets, note = families.moe_targets(model)
    assert targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "shared_expert_gate", "up_proj", "v_proj"]
    assert "4 routed experts" in note
    assert families.moe_targets(build_family("llama", len(tiny_tokenizer))) is None


@pytest.mark.parametrize("target", ["experts", "gate"])
def test_listing_moe_experts_or_router_is_one_line(target, recipe_dict, tiny_tokenizer):
    from qlora_cli.errors import ModelError
    from qlora_cli.model import adapters

    recipe = recipe_from(recipe_dict, lora={"target_modules": ["q_proj", target], "dropout": 0.05})
    with pytest.raises(ModelError, match=rf"`{target}` is a Mixtral\w+ on this mixture-of-experts model, not a linear layer; .*choose from k_proj"):
        adapters.attach(build_family("mixtral", len(tiny_tokenizer)), recipe)


def config_only_model(folder, config: dict) -> str:
    """A model folder holding only its config.json: enough for what happens before weights load."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_a_model_that_is_not_a_causal_lm_is_one_line_before_weights_load(recipe_dict, tmp_path):
    recipe_dict["model"]["path"] = config_only_model(tmp_path / "t5", {"model_type": "t5", "d_model": 16})
    line = one_line_error(invoke("train", write_recipe(tmp_path, recipe_dict)), 4)
    assert "'t5' model, which transformers cannot load as a causal language model" in line
    assert not (tmp_path / "run").exists()


def test_an_unknown_model_type_is_one_line(recipe_dict, tmp_path):
    recipe_dict["model"]["path"] = config_only_model(tmp_path / "odd", {"model_type": "llama-but-not-quite", "hidden_size": 16})
    line = one_line_error(invoke("validate", write_recipe(tmp_path, recipe_dict)), 4)
    assert "model type this transformers does not know" in line and "trust_remote_code" in line


def test_a_family_outside_the_tested_ones_is_said_to_be_untested_and_still_trains(tiny_tokenizer, tmp_path):
    """OLMo 2 (a causal LM transformers knows, not among ours): train, validate and estimate each say
    once what is tested and that it may still work; the run itself goes ahead."""
    import transformers as tf

    folder = tmp_path / "olmo2"
    config = tf.Olmo2Config(**{k: v for k, v in family_config("llama", len(tiny_tokenizer)).to_dict().items() if k in (
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
        "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings", "initializer_range")})
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    recipe = family_recipe(folder, tmp_path, bits=16)
    recipe["train"]["max_steps"] = 1
    expected = "model_type 'olmo2' is not among the families qlora is tested on (Llama, Mistral"

    result = run_training(recipe_from(recipe), show_progress=False)
    assert result.info["family"].startswith(expected) and result.info["family"].endswith("it may still work (transformers loads it as Olmo2ForCausalLM)")
    recipe["output"]["dir"] = str(tmp_path / "second")
    path = write_recipe(tmp_path, recipe)
    for command in ("validate", "estimate"):
        shown = invoke(command, path)
        assert shown.exit_code == 0, shown.output
        assert shown.stdout.count("is not among the families qlora is tested on") == 1, shown.stdout
    assert expected in " ".join(json.loads(invoke("validate", path, "--json").stdout)["notes"])
    llama = family_recipe(save_family("llama", tmp_path / "llama", tiny_tokenizer), tmp_path, bits=16)
    assert json.loads(invoke("validate", write_recipe(tmp_path, llama, "llama.yaml"), "--json").stdout)["notes"] == []
