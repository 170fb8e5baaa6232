"""Proof that a written GGUF file is the merged model: it is loaded back with plain transformers
(`from_pretrained(folder, gguf_file=...)`), its logits on the eval rows are compared with the
merged Hugging Face checkpoint's (top-1 agreement, max abs difference, mean KL), and its
tokenizer must encode the eval prompts to the same ids and carry the same chat template.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import shutil
import tempfile
from pathlib import Path

from qlora_cli.errors import ModelError
from qlora_cli.evaluate import drift, inference
from qlora_cli.model import loading

# The GGUF is judged against the merged checkpoint it was written from, so the only expected
# difference is its tensor type. f16 keeps 11 significant bits and bf16 8: from a bf16 merge,
# f16 is exact and bf16 a copy; from fp32, both round once, as a bf16 merge does (measured
# ~1-4% top-1 flips there, see drift.py). q8_0 rounds each block of 32 weights to 8 bits:
# measured 3.8% flips (max abs logit diff 1.38, mean KL 2.9e-3) on the quickstart run's 50 eval
# rows. A broken layout (a wrong q/k permutation or tensor name) gives near-random agreement.
MIN_TOP1_AGREEMENT = {"f16": 0.99, "bf16": 0.99, "q8_0": 0.95}


@contextlib.contextmanager
def alone(folder: Path, file_name: str):
    """A folder holding only the GGUF file (a hard link, else a symbolic one): given a folder
    that also holds tokenizer or config files, transformers mixes those into what it reads."""
    scratch = Path(tempfile.mkdtemp(prefix=".gguf-check-", dir=folder))
    try:
        try:
            os.link(folder / file_name, scratch / file_name)
        except OSError:
            os.symlink((folder / file_name).resolve(), scratch / file_name)
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def quiet_stderr():
    """transformers' GGUF loader draws its own tqdm bar on stderr; keep it out of our output."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def load_gguf_model(folder: Path, file_name: str, recipe):
    from transformers import AutoModelForCausalLM

    try:
        with quiet_stderr():
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), gguf_file=file_name, dtype=loading.compute_dtype(recipe), device_map=loading.device_map()
            )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"transformers cannot load the written {file_name}: {str(exc).splitlines()[0][:300]}") from None
    return model.eval()


def load_gguf_tokenizer(folder: Path, file_name: str):
    from transformers import AutoTokenizer

    try:
        with quiet_stderr():
            return AutoTokenizer.from_pretrained(str(folder), gguf_file=file_name)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"transformers cannot read the tokenizer of the written {file_name}: {str(exc).splitlines()[0][:300]}") from None


def eval_texts(eval_set: inference.EvalSet, tokenizer) -> list[tuple[str, bool]]:
    """(text, add_special_tokens) pairs: each prompt as inference encodes it, and each whole row."""
    if not eval_set.prompts:
        rows = [tokenizer.decode(ids) for ids in eval_set.tokenized["input_ids"]]
        return [(text, False) for text in rows]
    special = eval_set.format != "chat"
    prompts = [(prompt, special) for prompt in eval_set.prompts]
    rows = [(prompt + reference, special) for prompt, reference in zip(eval_set.prompts, eval_set.references)]
    return prompts + rows


def tokenizer_round_trip(original, exported, eval_set: inference.EvalSet) -> dict:
    """Whether the GGUF's tokenizer encodes every eval text to the ids the run's tokenizer gives."""
    texts = eval_texts(eval_set, original)
    differing = []
    for text, special in texts:
        expected = original(text, add_special_tokens=special)["input_ids"]
        actual = exported(text, add_special_tokens=special)["input_ids"]
        if expected != actual:
            differing.append({"text": text[-200:], "expected": expected[:50], "gguf": actual[:50]})
    specials = {
        name: [getattr(original, name), getattr(exported, name)]
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")
    }
    return {
        "texts": len(texts),
        "identical": len(texts) - len(differing),
        "differences": differing[:3],
        "chat_template_equal": (original.chat_template or None) == (exported.chat_template or None),
        "special_tokens_equal": all(a == b for a, b in specials.values()),
        "special_tokens": specials,
    }


def judge(logits: dict, tokens: dict, gguf_type: str) -> list[str]:
    failures = []
    limit = MIN_TOP1_AGREEMENT[gguf_type]
    if logits["top1_agreement"] < limit:
        failures.append(f"GGUF top-1 agreement with the merged model {logits['top1_agreement']:.2%} < {limit:.0%}")
    if tokens["identical"] != tokens["texts"]:
        failures.append(f"the GGUF tokenizer encodes {tokens['texts'] - tokens['identical']} of {tokens['texts']} eval texts differently")
    if not tokens["chat_template_equal"]:
        failures.append("the GGUF chat template differs from the run's")
    if not tokens["special_tokens_equal"]:
        failures.append(f"the GGUF special token ids differ: {tokens['special_tokens']}")
    return failures


def verify(recipe, folder: Path, file_name: str, tokenizer, gguf_type: str, samples, batch_size: int, show_progress: bool) -> dict:
    """The GGUF in `folder`, loaded back, against the merged checkpoint beside it."""
    eval_set = inference.load_eval_set(recipe, tokenizer, samples)
    with alone(folder, file_name) as scratch:
        tokens = tokenizer_round_trip(tokenizer, load_gguf_tokenizer(scratch, file_name), eval_set)
        exported = load_gguf_model(scratch, file_name, recipe)
    reference = inference.load_merged_model(folder, recipe)
    with inference.progress_bar(len(eval_set.tokenized), "verifying GGUF", show_progress) as advance:
        logits = drift.logit_drift(reference, exported, eval_set.tokenized, tokenizer.pad_token_id, batch_size, advance)
    del reference, exported
    gc.collect()
    failures = judge(logits, tokens, gguf_type)
    return {
        "reference": "the merged Hugging Face checkpoint",
        "rows": len(eval_set.tokenized),
        "logits": logits,
        "tokenizer": tokens,
        "min_top1_agreement": MIN_TOP1_AGREEMENT[gguf_type],
        "failures": failures,
        "passed": not failures,
    }
