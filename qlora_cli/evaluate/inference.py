"""Batched inference shared by `qlora evaluate` and `qlora merge`: the held-out rows, the
base + adapter as trained, teacher-forced logits over tokenized rows (right padding) and
greedy decoding of prompts (left padding). Masks always come from lengths, never pad ids.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from qlora_cli.data.collate import PaddingCollator
from qlora_cli.data.formats import prompt_and_reference
from qlora_cli.data.splits import eval_rows_for_generation, tokenize_rows
from qlora_cli.errors import ModelError
from qlora_cli.model import adapters, loading
from qlora_cli.model.quantized import speed_up_cpu_inference
from qlora_cli.recipe.schema import Recipe
from qlora_cli.rundir import read_adapter_config

Advance = Callable[[int], None]
# Decoding budget beyond the longest reference: enough to see what a wrong model says instead,
# small enough that a rambling base model does not dominate the run time.
GENERATION_MARGIN = 8


@dataclass
class EvalSet:
    """Held-out rows two ways: tokenized as training scores them, and as prompt/reference text."""

    tokenized: object  # datasets.Dataset with input_ids, labels, length
    prompts: list[str]  # empty for format text, which has no prompt/response split
    references: list[str]
    held_out: bool  # False when the recipe has no eval data and the training rows stand in
    format: str


def load_eval_set(recipe: Recipe, tokenizer, max_samples: Optional[int] = None) -> EvalSet:
    data = recipe.data
    rows = eval_rows_for_generation(data, recipe.train.seed)
    if max_samples:
        rows = rows.select(range(min(max_samples, len(rows))))
    tokenized, _ = tokenize_rows(rows, data, tokenizer, "data.eval" if data.eval else "data.train")
    prompts, references = [], []
    if data.format != "text":
        for row in rows:
            prompt, reference = prompt_and_reference(row, data, tokenizer)
            prompts.append(prompt)
            references.append(reference)
    return EvalSet(tokenized, prompts, references, held_out=bool(data.eval or data.eval_split), format=data.format)


def load_model_as_trained(recipe: Recipe, adapter_dir: Optional[Path] = None, bits: Optional[int] = None):
    """The base with the recipe's quantization (or `bits`), plus the adapter (unmerged) when given, for inference."""
    if adapter_dir is not None:
        read_adapter_config(adapter_dir)
    model = loading.load_base_model(recipe, bits)
    speed_up_cpu_inference(model)
    if adapter_dir is None:
        return model.eval()
    try:
        model = adapters.load_adapters(model, [("default", Path(adapter_dir))]).model
    except ModelError as exc:
        raise ModelError(f"{exc} (base {recipe.model.path})") from None
    return model.eval()


def load_merged_model(folder: Path, recipe: Recipe):
    """A standalone (merged) checkpoint with plain transformers, computing in the recipe's dtype."""
    from transformers import AutoModelForCausalLM

    if not (Path(folder) / "config.json").is_file():
        raise ModelError(f"{folder} is not a model folder (no config.json); pass the --output of `qlora merge`")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder),
            dtype=loading.compute_dtype(recipe),
            attn_implementation=loading.attn_implementation(recipe.model),
            device_map=loading.device_map(),
        )
    except (OSError, ValueError, ImportError) as exc:
        raise loading.load_failure(f"the merged model in {folder}", exc) from None
    return model.eval()


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def prompt_ids(prompt: str, format_name: str, tokenizer) -> list[int]:
    # As data/formats.py tokenizes prompts: a rendered chat template already holds its special tokens.
    return tokenizer(prompt, add_special_tokens=format_name != "chat")["input_ids"]


def left_padded(rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with rows aligned on the right, for decoding."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        input_ids[index, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[index, width - len(row):] = 1
    return input_ids, attention_mask


def default_max_new_tokens(references: list[str], tokenizer) -> int:
    longest = max((len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in references), default=0)
    return longest + 1 + GENERATION_MARGIN  # + 1 for the stop token


def stop_token_ids(model, tokenizer) -> list[int]:
    found = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    found += configured if isinstance(configured, list) else [configured]
    return sorted({token for token in found if token is not None})


@torch.no_grad()
def greedy_generate(
    model, tokenizer, prompts: list[list[int]], max_new_tokens: int, batch_size: int, advance: Optional[Advance] = None
) -> list[list[int]]:
    """Greedy continuations (token ids, cut before the first stop token), in prompt order.

    Prompts are sorted by length so each left-padded batch wastes little compute.
    """
    from transformers import GenerationConfig

    stops = stop_token_ids(model, tokenizer)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=stops
    )
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    results: list[list[int]] = [[] for _ in prompts]
    device = model_device(model)
    for start in range(0, len(order), batch_size):
        chosen = order[start:start + batch_size]
        input_ids, attention_mask = left_padded([prompts[index] for index in chosen], tokenizer.pad_token_id)
        output = model.generate(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), generation_config=config
        )
        for row, index in enumerate(chosen):
            new_tokens = output[row, input_ids.shape[1]:].tolist()
            cut = next((position for position, token in enumerate(new_tokens) if token in stops), len(new_tokens))
            results[index] = new_tokens[:cut]
        if advance:
            advance(len(chosen))
    return results


def batches(tokenized, pad_token_id: int, batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded batches of tokenized rows, with labels and an attention mask from lengths."""
    collate = PaddingCollator(pad_token_id)
    rows = [tokenized[index] for index in range(len(tokenized))]
    for start in range(0, len(rows), batch_size):
        yield collate(rows[start:start + batch_size])


@torch.no_grad()
def logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Teacher-forced logits in float32 for a right-padded batch."""
    device = model_device(model)
    output = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False)
    # Prompt / p-tuning prepend virtual tokens: keep the positions of the real ones.
    return output.logits[:, -batch["input_ids"].shape[1]:].float()


@contextlib.contextmanager
def progress_bar(total: int, description: str, enabled: bool = True):
    """A transient rich bar on stderr; yields the function that advances it."""
    if not enabled or total == 0:
        yield lambda count: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda count: progress.advance(task, count)
