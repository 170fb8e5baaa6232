"""Proof that a written GGUF file is the merged model: it is loaded back with plain transformers
(`from_pretrained(folder, gguf_file=...)`, plus the rope settings llama.cpp reads from the file and
transformers does not), its logits on the eval rows and on one row longer than any position-dependent
span of the model (a sliding window) are compared with the merged Hugging Face checkpoint's (top-1
agreement, max abs difference, mean KL), settings llama.cpp would not apply are named, and its
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
from typing import Optional

import numpy as np

from qlora_cli.data.formats import IGNORE_INDEX
from qlora_cli.errors import ModelError, library_message
from qlora_cli.evaluate import drift, inference
from qlora_cli.export import gguf_arch, gguf_writer
from qlora_cli.model import loading

# The GGUF is judged against the merged checkpoint it was written from, so the only expected
# difference is its tensor type. f16 keeps 11 significant bits and bf16 8: from a bf16 merge,
# f16 is exact and bf16 a copy; from fp32, both round once, as a bf16 merge does (measured
# ~1-4% top-1 flips there, see drift.py). q8_0 rounds each block of 32 weights to 8 bits:
# measured 3.8% flips (max abs logit diff 1.38, mean KL 2.9e-3) on the quickstart run's 50 eval
# rows. A broken layout (a wrong q/k permutation or tensor name) gives near-random agreement.
MIN_TOP1_AGREEMENT = {"f16": 0.99, "bf16": 0.99, "q8_0": 0.95}
# Eval rows are short (dozens of tokens), so a file that drops what happens further on (a sliding
# window, a rope scaling) would pass on them: the probe row is this long, or a sliding window plus
# a quarter of this, whichever is longer (capped at the context length). On a tiny Mistral with a
# window of 64, a file without the window agrees on 21% of the positions past it. The row repeats
# the eval rows' tokens, where a random model's logits are near ties: q8_0 measured 94.1% there on
# the tiny Llama of test_gguf_export (98.1% on its eval rows), so q8_0's bound for the row is lower.
PROBE_TOKENS = 256
PROBE_MIN_TOP1_AGREEMENT = {"f16": 0.99, "bf16": 0.99, "q8_0": 0.90}
# q4_0 and the k-quants (llama.cpp's quantizer) flip many near-tie positions of a small model's
# logits by design; their agreement here is reported, and they are judged in llama.cpp itself by
# the task (export/llamacpp_check.py: exact match within 5 points of the merged model's).


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


def load_gguf_model(folder: Path, file_name: str, recipe, reference_config=None) -> tuple[object, list[str]]:
    """(the GGUF's model as transformers loads it, with the rope settings of the file that its
    loader skips; what in the file contradicts `reference_config`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with quiet_stderr():
            config = AutoConfig.from_pretrained(str(folder), gguf_file=file_name)
            problems = [] if reference_config is None else apply_file_rope(config, folder / file_name, reference_config)
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), gguf_file=file_name, config=config, dtype=loading.compute_dtype(recipe), device_map=loading.device_map()
            )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"transformers cannot load the written {file_name}: {library_message(exc)}") from None
    return model.eval(), problems


def apply_file_rope(config, path: Path, reference_config) -> list[str]:
    """Give `config` (transformers' reading of the file) the rope llama.cpp reads from it:
    `{arch}.rope.scaling.*` (linear, yarn) and Llama 3's `rope_freqs.weight`, which transformers'
    GGUF loader skips for llama and qwen2. Returns what contradicts the merged model's rope."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    fields = {key: field.contents() for key, field in reader.fields.items()}
    arch = fields["general.architecture"]
    rope = {"rope_theta": float(fields.get(f"{arch}.rope.freq_base", gguf_arch.rope_parameters(config)["rope_theta"])), "rope_type": "default"}
    scaling = fields.get(f"{arch}.rope.scaling.type")
    if scaling in ("linear", "yarn"):
        rope.update(rope_type=scaling, factor=float(fields[f"{arch}.rope.scaling.factor"]))
        if scaling == "yarn":
            rope["original_max_position_embeddings"] = int(fields[f"{arch}.rope.scaling.original_context_length"])
    problems = []
    frequencies = next((tensor for tensor in reader.tensors if tensor.name == "rope_freqs.weight"), None)
    if frequencies is not None:
        expected = gguf_arch.rope_parameters(reference_config.get_text_config())
        if expected["rope_type"] == "llama3" and np.allclose(
                np.asarray(frequencies.data, dtype=np.float32), gguf_writer.llama3_rope_factors(reference_config.get_text_config(), expected)):
            rope = expected  # the file's per-frequency divisors are exactly these settings'
        else:
            problems.append("the GGUF's rope_freqs do not match the merged model's rope")
    config.rope_parameters = rope
    return problems


def probe_row(eval_set: inference.EvalSet, config) -> dict:
    """One row of the eval rows' own tokens, repeated, longer than the model's sliding window (and
    at least PROBE_TOKENS); its labels score only the positions from the window on."""
    text_config = config.get_text_config()
    window = gguf_arch.sliding_window(text_config) or 0
    length = min(text_config.max_position_embeddings, max(PROBE_TOKENS, window + PROBE_TOKENS // 4))
    tokens = [token for row in eval_set.tokenized["input_ids"] for token in row] or [0]
    ids = (tokens * (length // len(tokens) + 1))[:length]
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * min(window, length) + ids[window:], "window": window or None}


def load_gguf_tokenizer(folder: Path, file_name: str):
    from transformers import AutoTokenizer

    try:
        with quiet_stderr():
            return AutoTokenizer.from_pretrained(str(folder), gguf_file=file_name)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelError(f"transformers cannot read the tokenizer of the written {file_name}: {library_message(exc)}") from None


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


def judge(logits: dict, tokens: dict, gguf_type: str, probe: Optional[dict] = None, settings: Optional[list[str]] = None) -> list[str]:
    failures = list(settings or [])
    limit = MIN_TOP1_AGREEMENT.get(gguf_type)
    if limit is not None and logits["top1_agreement"] < limit:
        failures.append(f"GGUF top-1 agreement with the merged model {logits['top1_agreement']:.2%} < {limit:.0%}")
    if probe is not None:
        past = probe["top1_agreement_response"] if probe["window"] else probe["top1_agreement"]
        bound = PROBE_MIN_TOP1_AGREEMENT.get(gguf_type)
        if past is not None and bound is not None and past < bound:
            where = f"past its sliding window of {probe['window']}" if probe["window"] else "along it"
            failures.append(f"GGUF top-1 agreement on a {probe['tokens']}-token row {where} {past:.2%} < {bound:.0%}")
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
    reference = inference.load_merged_model(folder, recipe)
    settings = gguf_arch.uncarried_settings(reference.config, gguf_arch.ARCHITECTURES[reference.config.get_text_config().model_type][0])
    with alone(folder, file_name) as scratch:
        tokens = tokenizer_round_trip(tokenizer, load_gguf_tokenizer(scratch, file_name), eval_set)
        exported, contradictions = load_gguf_model(scratch, file_name, recipe, reference.config)
    row = probe_row(eval_set, reference.config)
    with inference.progress_bar(len(eval_set.tokenized) + 1, "verifying GGUF", show_progress) as advance:
        logits = drift.logit_drift(reference, exported, eval_set.tokenized, tokenizer.pad_token_id, batch_size, advance)
        probe = {"tokens": len(row["input_ids"]), "window": row["window"]}
        probe |= drift.logit_drift(reference, exported, [row], tokenizer.pad_token_id, 1, advance)
    del reference, exported
    gc.collect()
    failures = judge(logits, tokens, gguf_type, probe, settings + contradictions)
    return {
        "reference": "the merged Hugging Face checkpoint",
        "rows": len(eval_set.tokenized),
        "logits": logits,
        "position_probe": probe,
        "tokenizer": tokens,
        "min_top1_agreement": MIN_TOP1_AGREEMENT.get(gguf_type),
        "probe_min_top1_agreement": PROBE_MIN_TOP1_AGREEMENT.get(gguf_type),
        "failures": failures,
        "passed": not failures,
    }
