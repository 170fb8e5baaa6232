"""`qlora init`: a starting recipe for a model on a GPU. Quantization, gradient checkpointing,
micro-batch and sequence length are chosen with the estimator so the recipe fits the card; the
recipe is written commented (recipe/render.py). Pure arithmetic, like `qlora estimate`: no torch,
nothing downloaded for a catalog model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qlora_cli.atomic import write_text_atomic
from qlora_cli.cli.estimate import card_from_flags
from qlora_cli.errors import ConfigError, ResourceError
from qlora_cli.estimate import GIB, Architecture, Gpu, estimate, plan_from_recipe, resolve
from qlora_cli.estimate.advice import largest_fitting
from qlora_cli.estimate.gpu import cards_that_fit
from qlora_cli.estimate.plan import Plan
from qlora_cli.recipe.loader import validate_recipe
from qlora_cli.recipe.render import render
from qlora_cli.recipe.schema import Recipe

TASK_FORMATS = {"chat": "chat", "instruct": "alpaca", "text": "text"}
TARGET_SEQ_LEN = 2048
MIN_SEQ_LEN = 256
SEQ_STEP = 64
MAX_MICRO_BATCH = 16
ROWS_PER_STEP = 16  # micro-batch x gradient accumulation
HEADROOM = 0.10  # of the card, left free for what the estimate does not model
# Most preferred first: a 16-bit base trains the most accurate adapter, and recomputing activations
# costs ~30% more compute, so each is given up only when the card is too small for it.
CANDIDATES = ((16, False), (16, True), (4, False), (4, True))


@dataclass(frozen=True)
class Choice:
    bits: int
    gradient_checkpointing: bool
    micro_batch: int
    seq_len: int
    total: int  # estimated peak bytes
    reason: str


def _power_of_two_floor(value: int) -> int:
    return 1 << (value.bit_length() - 1)


def _label(bits: int, checkpointing: bool) -> str:
    return f"{bits}-bit with checkpointing {'on' if checkpointing else 'off'}"


def choose(arch: Architecture, plan: Plan, gpu: Gpu) -> Choice:
    """The most preferred (bits, checkpointing) in which a row of TARGET_SEQ_LEN tokens fits, with
    the largest micro-batch that fits; else the longest rows that fit at 4-bit with checkpointing."""
    budget = int(gpu.bytes * (1 - HEADROOM))
    usable = f"{budget / GIB:.1f} GiB usable"
    plan = plan.with_changes(seq_len=TARGET_SEQ_LEN, micro_batch=1)
    total = lambda bits, checkpointing, **changes: estimate(  # noqa: E731
        arch, plan.with_changes(bits=bits, gradient_checkpointing=checkpointing, **changes)).total
    for index, (bits, checkpointing) in enumerate(CANDIDATES):
        fits = lambda n: total(bits, checkpointing, micro_batch=n) <= budget  # noqa: E731, B023
        batch = largest_fitting(fits, 1, MAX_MICRO_BATCH)
        if batch is None:
            continue
        batch = _power_of_two_floor(batch)
        passed = [f"{_label(*better)} needs {total(*better) / GIB:.1f} GiB" for better in CANDIDATES[:index]]
        reason = (f"for one row of {TARGET_SEQ_LEN} tokens, " + ", ".join(passed) if passed else "the most accurate and fastest setting fits")
        return Choice(bits, checkpointing, batch, TARGET_SEQ_LEN, total(bits, checkpointing, micro_batch=batch), f"{reason} ({usable})")
    fits = lambda n: total(4, True, seq_len=n) <= budget  # noqa: E731
    seq = largest_fitting(fits, MIN_SEQ_LEN, TARGET_SEQ_LEN - 1)
    if seq is None:
        smallest = total(4, True, seq_len=MIN_SEQ_LEN)
        bigger = cards_that_fit(int(smallest / (1 - HEADROOM)))[:3]
        tip = f"use a card with more memory: {', '.join(bigger)}" if bigger else "no single card in the catalog is large enough"
        raise ResourceError(
            f"{arch.name} does not fit on {gpu.name} even as 4-bit with gradient checkpointing and one row of {MIN_SEQ_LEN} "
            f"tokens ({smallest / GIB:.1f} GiB estimated, {budget / GIB:.1f} GiB usable); {tip}"
        )
    seq = seq // SEQ_STEP * SEQ_STEP
    reason = f"one row of {TARGET_SEQ_LEN} tokens needs {total(4, True) / GIB:.1f} GiB even at 4-bit with checkpointing; rows cut to {seq} ({usable})"
    return Choice(4, True, 1, seq, total(4, True, seq_len=seq), reason)


def _output_dir(model: str, task: str) -> str:
    name = Path(model.rstrip("/")).name or "model"
    return f"runs/{name.lower()}-{task}"


def starting_recipe(model: str, task: str, choice: Optional[Choice] = None) -> dict:
    """The recipe as a raw dict; with a Choice, its memory settings."""
    recipe = {
        "model": {"path": model},
        "quantization": {"bits": 4},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"},
        "data": {"train": "data/train.jsonl", "format": TASK_FORMATS[task], "eval_split": 0.05, "max_seq_len": TARGET_SEQ_LEN, "packing": True},
        "train": {"epochs": 1, "learning_rate": 2e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.03, "micro_batch_size": 1,
                  "gradient_accumulation_steps": ROWS_PER_STEP, "gradient_checkpointing": True, "optimizer": "paged_adamw_8bit",
                  "logging_steps": 10, "eval_steps": 100, "save_steps": 100},
        "output": {"dir": _output_dir(model, task)},
    }
    if choice is not None:
        recipe["quantization"]["bits"] = choice.bits
        recipe["data"]["max_seq_len"] = choice.seq_len
        recipe["train"].update(micro_batch_size=choice.micro_batch, gradient_accumulation_steps=max(1, ROWS_PER_STEP // choice.micro_batch),
                               gradient_checkpointing=choice.gradient_checkpointing)
    return recipe


@dataclass(frozen=True)
class Started:
    output: Path
    recipe: Recipe
    choice: Choice
    gpu: Gpu
    arch: Architecture


def card(gpu: Optional[str], gpu_memory: Optional[str]) -> tuple[Gpu, str]:
    """The card and how `qlora estimate` names it (--gpu NAME or --gpu-memory SIZE)."""
    if bool(gpu) == bool(gpu_memory):
        raise ConfigError("give --gpu NAME (e.g. RTX4090) or --gpu-memory SIZE (e.g. 24GiB), one of them")
    return card_from_flags(gpu, gpu_memory), f"--gpu {gpu}" if gpu else f"--gpu-memory {gpu_memory.strip()}"


def init_recipe(model: str, gpu_name: Optional[str], task: str, output: Path, force: bool, gpu_memory: Optional[str] = None) -> Started:
    """Choose the settings, render the commented recipe, write it (atomically)."""
    output = Path(output)
    if output.is_dir():
        raise ResourceError(f"--output {output} is a directory; give a file name such as recipe.yaml")
    if output.exists() and not force:
        raise ResourceError(f"{output} already exists; pass --force to overwrite it or --output NEW.yaml")
    gpu, gpu_flag = card(gpu_name, gpu_memory)
    arch = resolve(model)
    # The catalog's hub id for a short name ("Llama-3.1-8B-Instruct"), a folder as given.
    local = Path(model).expanduser()
    model_path = (str(local.parent) if local.is_file() else model) if local.exists() else arch.name
    skeleton = validate_recipe(starting_recipe(model_path, task), source="qlora init")
    choice = choose(arch, plan_from_recipe(skeleton), gpu)
    recipe = validate_recipe(starting_recipe(model_path, task, choice), source="qlora init")
    header = [
        f"Starting recipe for {arch.name} on {gpu.name}, written by `qlora init --task {task}`.",
        f"Chosen with the memory estimate: {choice.bits}-bit base, gradient checkpointing "
        f"{'on' if choice.gradient_checkpointing else 'off'}, micro-batch {choice.micro_batch} x {choice.seq_len} tokens "
        f"-> {choice.total / GIB:.1f} GiB of {gpu.bytes / GIB:.1f} GiB ({int(100 * HEADROOM)}% of it kept free); {choice.reason}.",
        f"Check: qlora estimate {output} {gpu_flag}",
        f"Next: point data.train at your {TASK_FORMATS[task]}-format data, then `qlora validate` and `qlora train` this file.",
    ]
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, render(recipe, header, output))
    return Started(output, recipe, choice, gpu, arch)
