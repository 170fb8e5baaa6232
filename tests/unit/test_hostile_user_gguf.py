"""The hostile user's GGUF finding: a Mistral with a sliding window of 64 exported, and the export
passed its own check (top-1 99.81%) because every eval row was shorter than the window, while past
position 64 the file computed something else. Now every family we export is checked on a row
longer than its sliding window, a window llama.cpp would not apply refuses the export, and a file
that drops it fails the check. Tiny random models built here, each with a byte-level BPE tokenizer
(transformers reads GGUF tokenizers as BPE or sentencepiece, not word-level)."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_cli.errors import ModelError
from qlora_cli.export import gguf_arch, gguf_check, gguf_tokenizer
from qlora_cli.merge import fold
from tests.conftest import WORDS
from tests.unit.tiny_run import chat_rows, make_run

SHAPE = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.2, tie_word_embeddings=False,
)
WINDOW = 64
# Every family `qlora merge --format gguf` writes, with the position-dependent settings it may carry.
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama-linear-rope": ("LlamaConfig", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "mistral": ("MistralConfig", {"sliding_window": None}),  # Mistral 7B v0.2 / v0.3
    "mistral-window-as-long-as-its-context": ("MistralConfig", {"sliding_window": SHAPE["max_position_embeddings"]}),
    "qwen2": ("Qwen2Config", {}),
}


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS)] * 4 + [gguf_tokenizer.PROBE_TEXT] * 4 + [json.dumps(row) for row in chat_rows()]
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>")
    tokenizer.chat_template = (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    return tokenizer


def tiny_run(folder, family: str, **settings):
    """A finished run (random LoRA adapter) on a tiny random model of `family` (a key of FAMILIES)."""
    import transformers

    config_class, family_settings = FAMILIES[family]
    config = getattr(transformers, config_class)(vocab_size=432, **SHAPE, **{**family_settings, **settings})
    tokenizer = bpe_tokenizer()
    torch.manual_seed(0)
    model_dir = folder / "model"
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return make_run(folder / "run", model_dir)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_family_we_export_is_checked_on_a_row_longer_than_its_windows(family, tmp_path):
    run = tiny_run(tmp_path, family)
    result = fold.run_merge(run, tmp_path / "merged", dtype="fp32", formats="gguf", show_progress=False)
    check = result.report["gguf"]["verification"]
    assert result.gguf_failures == [] and check["passed"], check["failures"]
    probe = check["position_probe"]
    longest_row = check["logits"]["positions"]  # all eval rows together are shorter than the probe alone
    assert probe["tokens"] == SHAPE["max_position_embeddings"] >= gguf_check.PROBE_TOKENS > longest_row
    assert probe["top1_agreement"] >= gguf_check.MIN_TOP1_AGREEMENT["f16"]


def test_a_sliding_window_shorter_than_the_context_is_refused_before_anything_is_written(tmp_path):
    run = tiny_run(tmp_path, "mistral", sliding_window=WINDOW)
    with pytest.raises(ModelError, match=rf"sliding window of {WINDOW} tokens .* llama.cpp's llama architecture does not apply.* --format hf"):
        fold.run_merge(run, tmp_path / "merged", formats="hf,gguf", show_progress=False)
    assert not (tmp_path / "merged").exists() and list(tmp_path.glob(".merged.*")) == []
    qwen2 = tiny_run(tmp_path / "qwen2", "qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    with pytest.raises(ModelError, match=rf"qwen2 model attends within a sliding window of {WINDOW} tokens"):
        fold.run_merge(qwen2, tmp_path / "qwen2-merged", formats="gguf", show_progress=False)


def test_a_file_that_drops_the_window_fails_the_check_past_the_window(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    from qlora_cli.recipe.loader import load_recipe

    run = tiny_run(tmp_path, "mistral", sliding_window=WINDOW)
    # The writer as it was: no word about the window, so the file is written and checked.
    monkeypatch.setattr(gguf_arch, "uncarried_settings", lambda config, arch: [])
    result = fold.run_merge(run, tmp_path / "merged", dtype="fp32", formats="hf,gguf", show_progress=False)
    check = result.report["gguf"]["verification"]
    assert check["logits"]["top1_agreement"] >= 0.99  # the eval rows alone cannot tell
    assert any(f"row past its sliding window of {WINDOW}" in failure for failure in result.gguf_failures), result.gguf_failures
    assert check["position_probe"]["top1_agreement_response"] < 0.9

    monkeypatch.undo()  # and the check names the window itself, whatever the logits say
    verified = gguf_check.verify(load_recipe(run), tmp_path / "merged", "model-f16.gguf", AutoTokenizer.from_pretrained(run), "f16", 8, 8, False)
    assert any(f"sliding window of {WINDOW} tokens" in failure for failure in verified["failures"]), verified["failures"]
