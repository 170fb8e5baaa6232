"""`qlora evaluate`: loss and perplexity over exactly the tokens training scores, and greedy
generations scored by exact / normalised match, for the base, the base + adapter and a
merged folder side by side; the numbers and a few example generations go to eval.json.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import time
import unicodedata
from pathlib import Path
from typing import Optional

import torch

from qlora_cli import rundir
from qlora_cli.atomic import write_text_atomic
from qlora_cli.data.formats import IGNORE_INDEX
from qlora_cli.errors import ConfigError, ModelError
from qlora_cli.evaluate import inference
from qlora_cli.model import adapters, loading
from qlora_cli.recipe.loader import load_recipe
from qlora_cli.recipe.schema import Recipe

MODEL_KINDS = ("base", "adapter", "merged")
EXAMPLES = 5


def normalize_answer(text: str) -> str:
    """Case-folded, punctuation removed, whitespace collapsed ("  Sports!" -> "sports")."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(char for char in text if not unicodedata.category(char).startswith("P"))
    return " ".join(text.split())


def exact_match(generation: str, reference: str) -> bool:
    """Equal after stripping surrounding whitespace (decoders often add a leading space)."""
    return generation.strip() == reference.strip()


def normalized_match(generation: str, reference: str) -> bool:
    return normalize_answer(generation) == normalize_answer(reference)


def token_weighted_loss(model, tokenized, pad_token_id: int, batch_size: int, advance=None) -> tuple[float, int]:
    """(mean cross-entropy per scored token, scored tokens): every scored token weighs the same,
    whichever row it is in, as in training."""
    total, count = 0.0, 0
    for batch in inference.batches(tokenized, pad_token_id, batch_size):
        scores = inference.logits(model, batch)[:, :-1]
        labels = batch["labels"][:, 1:].to(scores.device)
        total += torch.nn.functional.cross_entropy(scores.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((labels != IGNORE_INDEX).sum())
        if advance:
            advance(len(batch["input_ids"]))
    return total / count, count


def score_model(model, tokenizer, eval_set: inference.EvalSet, max_new_tokens: int, batch_size: int, advance=None) -> dict:
    loss, scored = token_weighted_loss(model, eval_set.tokenized, tokenizer.pad_token_id, batch_size, advance)
    scores = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "scored_tokens": scored}
    if not eval_set.prompts:
        return scores | {"exact_match": None, "normalized_match": None, "generations": []}
    prompts = [inference.prompt_ids(prompt, eval_set.format, tokenizer) for prompt in eval_set.prompts]
    generated = inference.greedy_generate(model, tokenizer, prompts, max_new_tokens, batch_size, advance)
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    pairs = list(zip(texts, eval_set.references))
    scores["exact_match"] = sum(exact_match(g, r) for g, r in pairs) / len(pairs)
    scores["normalized_match"] = sum(normalized_match(g, r) for g, r in pairs) / len(pairs)
    scores["generations"] = texts
    return scores


def resolve_target(target: Path, overrides: Optional[list[str]] = None, data_file: Optional[Path] = None) -> tuple[Recipe, Path]:
    """(recipe, adapter folder): a run directory is its own adapter folder; a recipe file's is output.dir."""
    recipe = load_recipe(target, overrides)
    adapter_dir = Path(target) if Path(target).is_dir() else Path(recipe.output.dir)
    if data_file is not None:
        recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"eval": str(data_file)})})
    return recipe, adapter_dir


def parse_compare(spec: str, merged_dir: Optional[Path]) -> list[str]:
    kinds = [part.strip() for part in spec.split(",") if part.strip()]
    unknown = [kind for kind in kinds if kind not in MODEL_KINDS]
    if unknown or not kinds:
        raise ConfigError(f"--compare {spec!r}: choose from {', '.join(MODEL_KINDS)} (comma-separated)")
    if merged_dir is not None and "merged" not in kinds:
        kinds.append("merged")
    if "merged" in kinds and merged_dir is None:
        raise ConfigError("--compare merged needs the merged folder: add --merged DIR (the --output of `qlora merge`)")
    return [kind for kind in MODEL_KINDS if kind in kinds]


def run_evaluation(
    recipe: Recipe,
    adapter_dir: Optional[Path],
    compare: list[str],
    merged_dir: Optional[Path] = None,
    max_samples: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    batch_size: int = 16,
    show_progress: bool = True,
) -> dict:
    """Score each model in `compare` on the same eval rows; returns the eval.json content."""
    started = time.perf_counter()
    if "adapter" in compare:
        rundir.read_adapter_config(adapter_dir)
    if "merged" in compare and not (Path(merged_dir) / "config.json").is_file():
        raise ModelError(f"--merged {merged_dir} is not a model folder (no config.json); pass the --output of `qlora merge`")
    tokenizer = loading.load_tokenizer(recipe.model)
    eval_set = inference.load_eval_set(recipe, tokenizer, max_samples)
    if max_new_tokens is None:
        max_new_tokens = inference.default_max_new_tokens(eval_set.references, tokenizer)
    work = len(eval_set.tokenized) + len(eval_set.prompts)

    def score(name: str, model) -> dict:
        with inference.progress_bar(work, f"evaluating {name}", show_progress) as advance:
            return score_model(model, tokenizer, eval_set, max_new_tokens, batch_size, advance)

    results: dict[str, dict] = {}
    if "base" in compare or "adapter" in compare:
        model = inference.load_model_as_trained(recipe, adapter_dir if "adapter" in compare else None)
        if "base" in compare:
            # One loaded base serves both: the adapter is switched off for "base".
            without_adapter = adapters.only_base(model) if "adapter" in compare else contextlib.nullcontext()
            with without_adapter:
                results["base"] = score("base", model)
        if "adapter" in compare:
            results["adapter"] = score("adapter", model)
        del model
        gc.collect()
    if "merged" in compare:
        results["merged"] = score("merged", inference.load_merged_model(merged_dir, recipe))
        gc.collect()

    quant = recipe.quantization
    examples = [
        {"prompt": prompt, "reference": reference} | {name: results[name]["generations"][index] for name in results}
        for index, (prompt, reference) in enumerate(zip(eval_set.prompts[:EXAMPLES], eval_set.references))
    ]
    return {
        "adapter": str(adapter_dir) if "adapter" in compare else None,
        "merged": str(merged_dir) if merged_dir is not None else None,
        "base_model": recipe.model.path,
        "data": recipe.data.eval if recipe.data.eval else recipe.data.model_dump(mode="json")["train"],
        "held_out": eval_set.held_out,
        "rows": len(eval_set.tokenized),
        "generation_rows": len(eval_set.prompts),
        "quantization": loading.quantization_label(quant),
        "compute_dtype": str(loading.compute_dtype(recipe)).removeprefix("torch."),
        "max_new_tokens": max_new_tokens,
        "models": {name: {k: v for k, v in scores.items() if k != "generations"} for name, scores in results.items()},
        "examples": examples,
        "wall_time_s": round(time.perf_counter() - started, 1),
    }


def write_report(report: dict, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, json.dumps(report, indent=2) + "\n")
