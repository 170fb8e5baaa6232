"""`qlora evaluate` for the objectives beyond SFT: on held-out pairs, how often each model prefers
`chosen` over `rejected` by summed log-probability of the response (reward accuracy) and the mean
log-probability margin, base vs adapter; with both, the DPO implicit reward (the adapter's margin
minus the base's) too. GRPO runs are scored by evaluate/rewards.py.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Optional

import datasets

from qlora_cli.data.formats import IGNORE_INDEX
from qlora_cli.data.splits import eval_rows_for_generation, tokenize_rows
from qlora_cli.errors import DataError
from qlora_cli.evaluate import inference
from qlora_cli.model import adapters, loading
from qlora_cli.recipe.schema import Recipe


def scored_sequences(pairs) -> datasets.Dataset:
    """Each pair as two rows (prompt + chosen, prompt + rejected), only the response scored."""
    rows = {"input_ids": [], "labels": []}
    for pair in pairs:
        prompt = pair["prompt_ids"]
        for name in ("chosen_ids", "rejected_ids"):
            rows["input_ids"].append(prompt + pair[name])
            rows["labels"].append([IGNORE_INDEX] * len(prompt) + pair[name])
    return datasets.Dataset.from_dict(rows)


def sequence_logps(model, sequences, pad_token_id: int, batch_size: int, advance=None) -> list[float]:
    """Summed log-probability of the scored tokens of each row."""
    totals = []
    for batch in inference.batches(sequences, pad_token_id, batch_size):
        logprobs = inference.logits(model, batch)[:, :-1].log_softmax(-1)
        labels = batch["labels"][:, 1:].to(logprobs.device)
        scored = labels != IGNORE_INDEX
        picked = logprobs.gather(2, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        totals.extend((picked * scored).sum(dim=1).tolist())
        if advance:
            advance(len(batch["input_ids"]) // 2)
    return totals


def pair_scores(logps: list[float]) -> dict:
    margins = [chosen - rejected for chosen, rejected in zip(logps[0::2], logps[1::2])]
    return {
        "reward_accuracy": sum(margin > 0 for margin in margins) / len(margins),
        "mean_margin": sum(margins) / len(margins),
        "chosen_logp": sum(logps[0::2]) / len(margins),
        "rejected_logp": sum(logps[1::2]) / len(margins),
        "margins": margins,
    }


def held_out_pairs(recipe: Recipe, tokenizer, max_samples: Optional[int]):
    data = recipe.data
    if data.format == "unpaired_preference":
        raise DataError("evaluate scores pairs (format preference); a kto run's unpaired rows have no rejected answer to compare with")
    rows = eval_rows_for_generation(data, recipe.train.seed)
    if max_samples:
        rows = rows.select(range(min(max_samples, len(rows))))
    pairs, _ = tokenize_rows(rows, data, tokenizer, "data.eval" if data.eval else "data.train")
    return pairs


def run_preference_evaluation(recipe: Recipe, adapter_dir: Path, compare: list[str], max_samples: Optional[int],
                              batch_size: int, show_progress: bool = True) -> dict:
    """Reward accuracy and mean margin of each model on the held-out pairs; returns the eval.json content."""
    started = time.perf_counter()
    tokenizer = loading.load_tokenizer(recipe.model)
    pairs = held_out_pairs(recipe, tokenizer, max_samples)
    sequences = scored_sequences(pairs)
    model = inference.load_model_as_trained(recipe, adapter_dir if "adapter" in compare else None)
    results = {}
    for name in ("base", "adapter"):
        if name not in compare:
            continue
        without = adapters.only_base(model) if name == "base" and "adapter" in compare else contextlib.nullcontext()
        with without, inference.progress_bar(len(pairs), f"scoring pairs ({name})", show_progress) as advance:
            results[name] = pair_scores(sequence_logps(model, sequences, tokenizer.pad_token_id, batch_size, advance))
    if "base" in results and "adapter" in results:
        beta = recipe.preference.beta
        implicit = [beta * (a - b) for a, b in zip(results["adapter"]["margins"], results["base"]["margins"])]
        results["adapter"]["implicit_reward_accuracy"] = sum(value > 0 for value in implicit) / len(implicit)
        results["adapter"]["implicit_reward_margin"] = sum(implicit) / len(implicit)
    return {
        "objective": recipe.train.objective,
        "adapter": str(adapter_dir) if "adapter" in compare else None,
        "base_model": recipe.model.path,
        "data": recipe.data.eval if recipe.data.eval else recipe.data.train,
        "held_out": bool(recipe.data.eval or recipe.data.eval_split),
        "rows": len(pairs),
        "quantization": loading.quantization_label(recipe.quantization),
        "compute_dtype": str(loading.compute_dtype(recipe)).removeprefix("torch."),
        "models": {name: {k: v for k, v in scores.items() if k != "margins"} for name, scores in results.items()},
        "wall_time_s": round(time.perf_counter() - started, 1),
    }
