"""qlora merge on the tiny Llama: the written folder loads with plain transformers and matches
base + adapter in both base modes (and DoRA), the verification reports the drift, and every
refusal happens before anything is written (and nothing half-written is ever left)."""

import json
import shutil
from collections import namedtuple

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_cli.errors import ConfigError, ModelError, ResourceError
from qlora_cli.evaluate import drift
from qlora_cli.evaluate.inference import load_model_as_trained
from qlora_cli.merge import fold, preflight
from qlora_cli.model import loading
from qlora_cli.recipe.loader import load_recipe
from tests.unit.tiny_run import make_run

IDS = torch.tensor([[3, 4, 30, 31, 5, 2, 3, 5, 60, 61, 62]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits.float()


def leftovers(output):
    return [path.name for path in output.parent.iterdir() if path.name.startswith(f".{output.name}.")]


def unmerged_16bit(run):
    """The original 16-bit base + adapter, unmerged (what `--base original` should equal)."""
    from peft import PeftModel

    base = loading.load_base_model(load_recipe(run), bits=16)
    return PeftModel.from_pretrained(base, str(run)).eval()


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_16bit_merge_round_trip(tmp_path, tiny_model_dir, use_dora):
    run = make_run(tmp_path / "run", tiny_model_dir, bits=16, use_dora=use_dora)
    output = tmp_path / "merged"
    result = fold.run_merge(run, output, dtype="fp32", show_progress=False)
    assert result.failures == [] and result.report["update_rounding"] == (None if use_dora else 0.0)
    # vLLM serves the LoRA adapter itself; a DoRA adapter only through this merged checkpoint.
    assert result.report["vllm"] == (f"cannot serve the adapter as a LoRA: vLLM does not serve DoRA adapters; serve the merged checkpoint "
                                     f"instead: vllm serve {output}" if use_dora else
                                     "serves the adapter: vllm serve BASE --enable-lora --lora-modules NAME=RUN_DIR")
    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    reference = load_model_as_trained(load_recipe(run), run)
    base = loading.load_base_model(load_recipe(run)).eval()
    assert (logits(reference) - logits(base)).abs().max() > 0.1  # the adapter matters...
    torch.testing.assert_close(logits(merged), logits(reference), atol=1e-4, rtol=0)  # ...and is folded in
    config = json.loads((output / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    assert not (output / "adapter_config.json").exists() and leftovers(output) == []
    for name in ("model.safetensors", "generation_config.json", "tokenizer.json", "chat_template.jinja", "merge_report.json"):
        assert (output / name).is_file(), name
    check = json.loads((output / "merge_report.json").read_text())["verification"]["merge_exactness"]
    assert check["top1_agreement"] == 1.0 and check["mean_kl"] < 1e-6 and check["greedy"]["identical"] == check["greedy"]["prompts"]


def test_4bit_merge_into_dequantized_weights_matches_the_model_as_trained(tmp_path, tiny_model_dir):
    run = make_run(tmp_path / "run", tiny_model_dir, bits=4)
    output = tmp_path / "merged"
    result = fold.run_merge(run, output, base_mode="dequantized", dtype="fp32", show_progress=False)
    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    as_trained = load_model_as_trained(load_recipe(run), run)
    torch.testing.assert_close(logits(merged), logits(as_trained), atol=1e-4, rtol=0)
    assert (logits(merged) - logits(unmerged_16bit(run))).abs().max() > 1e-3  # NF4 rounding is in the weights
    check = result.report["verification"]
    assert result.failures == [] and check["thresholds"] == drift.THRESHOLDS["fp32"]
    assert check["merge_exactness"] == check["model_as_trained"] and check["merge_exactness"]["mean_kl"] < 1e-6
    assert "quantization_config" not in json.loads((output / "config.json").read_text())


def test_4bit_merge_into_original_weights_matches_16bit_base_plus_adapter(tmp_path, tiny_model_dir):
    run = make_run(tmp_path / "run", tiny_model_dir, bits=4)
    output = tmp_path / "merged"
    result = fold.run_merge(run, output, base_mode="original", dtype="fp32", show_progress=False)
    merged = AutoModelForCausalLM.from_pretrained(output).eval()
    torch.testing.assert_close(logits(merged), logits(unmerged_16bit(run)), atol=1e-4, rtol=0)
    check = result.report["verification"]
    # Judged against the 16-bit base + adapter; the NF4 error shows as reported drift from the 4-bit model as trained.
    assert check["merge_exactness"]["reference"] == "16-bit base + adapter, unmerged" and check["merge_exactness"]["mean_kl"] < 1e-6
    assert check["model_as_trained"]["reference"].startswith("4-bit base + adapter")
    assert check["model_as_trained"]["max_abs_logit_diff"] > 1e-3 and result.failures == []


def test_bf16_output_is_written_in_bf16_and_shards(tmp_path, tiny_model_dir):
    run = make_run(tmp_path / "run", tiny_model_dir, bits=16)
    output = tmp_path / "merged"
    result = fold.run_merge(run, output, dtype="bf16", max_shard_size="100KB", verify=False, show_progress=False)
    assert 0 < result.report["update_rounding"] < 0.05  # the random test adapter is large next to bf16 spacing
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"
    assert len(list(output.glob("*.safetensors"))) > 1 and (output / "model.safetensors.index.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(output).dtype == torch.bfloat16
    assert json.loads((output / "merge_report.json").read_text())["verification"] is None


def test_drift_beyond_the_thresholds_fails_but_keeps_the_report(tmp_path, tiny_model_dir, monkeypatch):
    run = make_run(tmp_path / "run", tiny_model_dir, bits=16)
    monkeypatch.setitem(drift.THRESHOLDS, "bf16", {"min_top1_agreement": 1.01, "max_mean_kl": -1.0})
    result = fold.run_merge(run, tmp_path / "merged", dtype="bf16", show_progress=False)
    assert len(result.failures) == 3 and "top-1 agreement" in result.failures[0]
    assert json.loads((tmp_path / "merged" / "merge_report.json").read_text())["verification"]["failures"] == result.failures


def test_a_merge_that_lost_the_adapter_fails_verification(tmp_path, tiny_model_dir, monkeypatch):
    run = make_run(tmp_path / "run", tiny_model_dir, bits=16)
    monkeypatch.setattr(fold, "merged_model", lambda recipe, *args: (loading.load_base_model(recipe, bits=16), None))
    result = fold.run_merge(run, tmp_path / "merged", dtype="fp32", show_progress=False)
    assert result.failures and not result.report["verification"]["passed"]


def test_cli_exit_codes(tmp_path, tiny_model_dir, monkeypatch):
    from typer.testing import CliRunner

    from qlora_cli.cli import app

    run = make_run(tmp_path / "run", tiny_model_dir, bits=16)
    ok = CliRunner().invoke(app, ["merge", str(run), "--output", str(tmp_path / "a"), "--dtype", "fp32"])
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output and "top-1 agreement" in ok.output
    refused = CliRunner().invoke(app, ["merge", str(run), "--output", str(tmp_path / "a")])
    assert refused.exit_code == 5 and "not empty" in refused.output
    monkeypatch.setitem(drift.THRESHOLDS, "bf16", {"min_top1_agreement": 1.01, "max_mean_kl": 1.0})
    failed = CliRunner().invoke(app, ["merge", str(run), "--output", str(tmp_path / "b"), "--json"])
    assert failed.exit_code == 6 and "drifts" in failed.output and (tmp_path / "b" / "merge_report.json").is_file()
    skipped = CliRunner().invoke(app, ["merge", str(run), "--output", str(tmp_path / "c"), "--no-verify"])
    assert skipped.exit_code == 0


# ---- refusals: each before any weight is loaded or anything is written ----------------------


@pytest.fixture
def run16(tmp_path, tiny_model_dir):
    return make_run(tmp_path / "run", tiny_model_dir, bits=16)


def refuse(run, output, error, match, **kwargs):
    with pytest.raises(error, match=match):
        fold.run_merge(run, output, show_progress=False, **kwargs)
    assert leftovers(output) == []


def test_refuses_a_non_empty_output_without_force(run16, tmp_path, monkeypatch):
    output = tmp_path / "merged"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    refuse(run16, output, ResourceError, "not empty.*--force")
    refuse(run16, output, ResourceError, "replaces an earlier qlora merge output", force=True)  # not a merge: nothing deleted
    assert (output / "keep.txt").read_text() == "mine"
    (output / "keep.txt").unlink()
    fold.run_merge(run16, output, verify=False, show_progress=False)
    (output / "stale.txt").write_text("from the earlier merge's folder")
    fold.run_merge(run16, output, force=True, verify=False, show_progress=False)
    assert not (output / "stale.txt").exists() and (output / "model.safetensors").is_file() and (output / preflight.REPORT_NAME).is_file()
    monkeypatch.chdir(output)
    refuse(run16, output, ResourceError, "holds the current directory", force=True)
    assert (output / preflight.REPORT_NAME).is_file()


def test_refuses_to_write_over_the_run_or_the_base(run16, tiny_model_dir, tmp_path):
    refuse(run16, run16, ResourceError, "would replace", force=True)
    refuse(run16, tiny_model_dir, ResourceError, "would replace", force=True)
    assert (run16 / "adapter_model.safetensors").is_file()


def test_refuses_a_missing_base(run16, tmp_path):
    refuse(run16, tmp_path / "merged", ModelError, "base model .* is missing.*--set model.path", overrides=["model.path=/nowhere/base"])


def test_refuses_an_adapter_that_cannot_be_merged(run16, tmp_path):
    config = json.loads((run16 / "adapter_config.json").read_text())
    (run16 / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}))
    refuse(run16, tmp_path / "merged", ModelError, "(?i)prompt_tuning adapter, which cannot be merged")


def test_refuses_a_run_without_an_adapter(run16, tmp_path):
    (run16 / "adapter_model.safetensors").unlink()
    refuse(run16, tmp_path / "merged", ModelError, "no adapter_model.safetensors")


def test_refuses_a_tokenizer_larger_than_the_embedding(run16, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run16)
    tokenizer.add_tokens(["zebra", "yak"])
    tokenizer.save_pretrained(run16)
    refuse(run16, tmp_path / "merged", ModelError, "73 tokens but .* 71 embedding rows")


def test_a_tokenizer_smaller_than_the_embedding_is_fine(tmp_path, tiny_tokenizer):
    preflight.check_vocabulary(tiny_tokenizer, len(tiny_tokenizer) + 57, "a padded vocabulary")


def test_refuses_when_the_disk_is_too_small(run16, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    refuse(run16, tmp_path / "merged", ResourceError, "needs about .* GB but .* free")


def test_refuses_dequantized_for_a_16bit_run_and_bad_options(run16, tmp_path):
    refuse(run16, tmp_path / "merged", ConfigError, "use --base original", base_mode="dequantized")
    refuse(run16, tmp_path / "merged", ConfigError, "--base 'nf4'", base_mode="nf4")
    refuse(run16, tmp_path / "merged", ConfigError, "--dtype", dtype="int8")
    refuse(run16, tmp_path / "merged", ConfigError, "--max-shard-size", max_shard_size="big")


def test_a_crash_while_writing_leaves_no_half_checkpoint(run16, tmp_path, monkeypatch):
    def crash(model, tokenizer, folder, max_shard_size):
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(fold, "write_checkpoint", crash)
    output = tmp_path / "merged"
    with pytest.raises(KeyboardInterrupt):
        fold.run_merge(run16, output, show_progress=False)
    assert not output.exists() and leftovers(output) == []
