"""Every family GGUF export claims, run in llama.cpp itself: a tiny random-weight model of each
(tests/families.py) written as f16 loads in llama.cpp, whose next-token choice agrees with
transformers' at (nearly) every position and whose greedy continuation is transformers' own.
A wrong tensor name, order, fused-tensor split or rope layout gives near-random agreement."""

import numpy as np
import pytest
import torch

from qlora_cli.export import gguf_arch, gguf_writer
from tests.families import build_family, family_config
from tests.llamacpp import llamacpp_runtime  # noqa: F401 - fixture
from tests.unit.test_gguf_export import build_tiny_bpe_tokenizer

GGUF_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "gemma2", "gemma3")
# f16 rounding of a random model's weights flips only near-ties: measured 100% on every family here.
MIN_TOP1 = 0.97
MAX_LOGIT_DIFF = 0.02


def build(family: str, vocab_size: int):
    """The family's tiny model; Gemma 2 as released: tied embeddings, queries scaled by 1/sqrt(head_dim).
    Gemma 3 as released: a sliding layer (a 6-token window, shorter than the test's text, with its own
    rope base) before a global one (rope base 1e6, linear scaling), queries scaled by 1/sqrt(head_dim)."""
    if family not in ("gemma2", "gemma3"):
        return build_family(family, vocab_size)
    from transformers import AutoModelForCausalLM

    config = family_config(family, vocab_size)
    config.tie_word_embeddings, config.query_pre_attn_scalar = True, config.head_dim
    if family == "gemma3":
        config.sliding_window, config.layer_types = 6, ["sliding_attention", "full_attention"]
        config.rope_parameters = {"full_attention": {"rope_type": "linear", "rope_theta": 1_000_000.0, "factor": 2.0},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_bpe_tokenizer("gpt-2")


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_family_gguf_runs_in_llama_cpp_as_in_transformers(family, tokenizer, tmp_path, llamacpp_runtime):  # noqa: F811
    model = build(family, len(tokenizer))
    path = tmp_path / f"{family}.gguf"
    # Not named after the family: llama.cpp gives a model named "phi3" Phi-3 vocabulary rules (</s> must exist).
    summary = gguf_writer.write_gguf(model, tokenizer, path, "f16", "tiny random model")
    assert summary["architecture"] == gguf_arch.ARCHITECTURES[model.config.model_type][0]
    ids = tokenizer("the cat and the dog play music in the rain while the weather turns cold", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].float().numpy()
        # no end token: the whole budget, compared as far as llama.cpp went
        continuation = model.generate(torch.tensor([ids[:8]]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, 8:].tolist()
    with llamacpp_runtime.Model(path, n_ctx=128) as runtime:
        assert runtime.tokenize("the cat and the dog", add_special=False) == tokenizer("the cat and the dog", add_special_tokens=False)["input_ids"]
        actual = runtime.logits(ids)
        greedy, _ = runtime.greedy(ids[:8], 12)
    agreement = float((actual.argmax(-1) == expected.argmax(-1)).mean())
    assert agreement >= MIN_TOP1, (family, agreement)
    # Measured max |logit difference| / max |logit|: 0.06% (Gemma) to 0.42% (Llama); a Gemma 3 file with its
    # sliding layers' rope base wrong gave 9.8%, one without the sliding-layer pattern fails top-1 too.
    assert np.abs(actual - expected).max() < MAX_LOGIT_DIFF * np.abs(expected).max(), family
    assert greedy == continuation[:len(greedy)] and len(greedy) >= 1, (family, greedy, continuation)


def test_gemma2_settings_llama_cpp_would_not_apply_are_refused_before_writing(tokenizer):
    from qlora_cli.errors import ModelError

    model = build_family("gemma2", len(tokenizer))  # untied lm_head, query_pre_attn_scalar 256 of head_dim 16
    with pytest.raises(ModelError, match="reuses the token embeddings as output"):
        gguf_arch.check_architecture(model.config)
    model.config.tie_word_embeddings = True
    with pytest.raises(ModelError, match=r"query_pre_attn_scalar=256.*1/sqrt\(16\)"):
        gguf_arch.check_architecture(model.config)
