"""How far a merged model drifts from the base + adapter it came from: logits on the eval
rows (max abs difference, mean KL divergence, top-1 agreement over every real position) and
greedy generations, judged against thresholds that depend on the output dtype.
"""

from __future__ import annotations

import gc
from typing import Optional

import torch

from qlora_cli.data.formats import IGNORE_INDEX
from qlora_cli.evaluate import inference
from qlora_cli.model import loading

# The judged comparison is always against the unmerged model whose weights the merge folded
# the adapter into, so the only expected difference is rounding W + BA once to the output
# dtype. fp32 keeps 24 significant bits: measured drift is < 1e-7 KL, so the bound is tight.
# bf16 keeps 8 (fp16 11), which is coarse next to a small update: measured on SmolLM2-135M,
# mean KL 5e-4 / 2.4e-3 and 1.8% / 3.7% top-1 flips (QLoRA run, 10-step 16-bit LoRA), while
# dropping the adapter costs KL 1.2-3.7 and ~50% flips. The 16-bit bounds sit ~8x above the
# rounding cost and ~60x below a lost adapter; report["update_rounding"] says how much of the
# update the dtype lost.
THRESHOLDS = {
    "fp32": {"min_top1_agreement": 0.999, "max_mean_kl": 1e-5},
    "bf16": {"min_top1_agreement": 0.90, "max_mean_kl": 2e-2},
    "fp16": {"min_top1_agreement": 0.90, "max_mean_kl": 2e-2},
}


def logit_drift(reference, merged, tokenized, pad_token_id: int, batch_size: int, advance=None) -> dict:
    """Compare teacher-forced logits at every non-padding position (masks from lengths)."""
    max_abs, kl_sum, positions, agree = 0.0, 0.0, 0, 0
    scored_positions, scored_agree = 0, 0
    for batch in inference.batches(tokenized, pad_token_id, batch_size):
        real = batch["attention_mask"].bool()
        # Position t predicts token t+1: it is a response position when label t+1 is scored.
        predicts_scored = torch.zeros_like(real)
        predicts_scored[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
        expected = inference.logits(reference, batch)[real.to(reference.device)].cpu()
        actual = inference.logits(merged, batch)[real.to(merged.device)].cpu()
        max_abs = max(max_abs, float((expected - actual).abs().max()))
        log_expected, log_actual = expected.log_softmax(-1), actual.log_softmax(-1)
        kl_sum += float((log_expected.exp() * (log_expected - log_actual)).sum())
        same_top1 = expected.argmax(-1) == actual.argmax(-1)
        positions += len(same_top1)
        agree += int(same_top1.sum())
        scored = predicts_scored[real]
        scored_positions += int(scored.sum())
        scored_agree += int((same_top1 & scored).sum())
        if advance:
            advance(len(batch["input_ids"]))
    return {
        "positions": positions,
        "max_abs_logit_diff": max_abs,
        "mean_kl": max(kl_sum / positions, 0.0),
        "top1_agreement": agree / positions,
        "response_positions": scored_positions,
        "top1_agreement_response": scored_agree / scored_positions if scored_positions else None,
    }


def greedy_agreement(reference, merged, tokenizer, eval_set: inference.EvalSet, batch_size: int, advance=None) -> Optional[dict]:
    """Whether both models decode the same tokens from each eval prompt (None for format text)."""
    if not eval_set.prompts:
        return None
    prompts = [inference.prompt_ids(prompt, eval_set.format, tokenizer) for prompt in eval_set.prompts]
    budget = inference.default_max_new_tokens(eval_set.references, tokenizer)
    expected = inference.greedy_generate(reference, tokenizer, prompts, budget, batch_size, advance)
    actual = inference.greedy_generate(merged, tokenizer, prompts, budget, batch_size, advance)
    differing = [index for index, (a, b) in enumerate(zip(expected, actual)) if a != b]
    return {
        "prompts": len(prompts),
        "identical": len(prompts) - len(differing),
        "max_new_tokens": budget,
        "differences": [
            {"prompt": eval_set.prompts[index][-200:], "adapter": tokenizer.decode(expected[index], skip_special_tokens=True),
             "merged": tokenizer.decode(actual[index], skip_special_tokens=True)}
            for index in differing[:3]
        ],
    }


def judge(drift: dict, limits: dict) -> list[str]:
    """The reasons the merge fails its check (empty when it passes)."""
    failures = []
    if drift["top1_agreement"] < limits["min_top1_agreement"]:
        failures.append(f"top-1 agreement {drift['top1_agreement']:.2%} < {limits['min_top1_agreement']:.1%}")
    if drift["mean_kl"] > limits["max_mean_kl"]:
        failures.append(f"mean KL {drift['mean_kl']:.2e} > {limits['max_mean_kl']:.0e}")
    if drift["top1_agreement_response"] is not None and drift["top1_agreement_response"] < limits["min_top1_agreement"]:
        failures.append(f"top-1 agreement on response tokens {drift['top1_agreement_response']:.2%} < {limits['min_top1_agreement']:.1%}")
    return failures


def verify(recipe, run_dir, merged_dir, tokenizer, base_mode: str, dtype: str, samples, batch_size: int, show_progress: bool) -> dict:
    """The written checkpoint, loaded back with plain transformers, against base + adapter unmerged.

    Judged against the unmerged model whose weights the merge used. For `--base original`
    on a QLoRA run that is the 16-bit base + adapter; the drift from the model as trained
    (4-bit base + adapter) is the price of that choice, reported but not judged.
    """
    eval_set = inference.load_eval_set(recipe, tokenizer, samples)
    merged = inference.load_merged_model(merged_dir, recipe)
    quant = recipe.quantization
    separate_exact = base_mode == "original" and quant.bits != 16
    work = (2 if separate_exact else 1) * len(eval_set.tokenized) + 2 * len(eval_set.prompts)
    pad = tokenizer.pad_token_id
    with inference.progress_bar(work, "verifying merge", show_progress) as advance:
        reference = inference.load_model_as_trained(recipe, run_dir)
        as_trained = {"reference": f"{quant.bits}-bit base + adapter, unmerged (the model as trained)"}
        as_trained |= logit_drift(reference, merged, eval_set.tokenized, pad, batch_size, advance)
        as_trained["greedy"] = greedy_agreement(reference, merged, tokenizer, eval_set, batch_size, advance)
        del reference
        gc.collect()
        exact = as_trained
        if separate_exact:
            reference = inference.load_model_as_trained(recipe, run_dir, bits=16)
            exact = {"reference": "16-bit base + adapter, unmerged"}
            exact |= logit_drift(reference, merged, eval_set.tokenized, pad, batch_size, advance)
            del reference
    del merged
    gc.collect()
    limits = THRESHOLDS[dtype]
    failures = judge(exact, limits)
    return {
        "compute_dtype": str(loading.compute_dtype(recipe)).removeprefix("torch."),
        "rows": len(eval_set.tokenized),
        "held_out": eval_set.held_out,
        "merge_exactness": exact,
        "model_as_trained": as_trained,
        "thresholds": limits,
        "failures": failures,
        "passed": not failures,
    }
