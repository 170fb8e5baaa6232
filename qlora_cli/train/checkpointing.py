"""Checkpoints and final outputs that survive a kill at any moment.

A checkpoint is written into a hidden staging folder and renamed to `checkpoint-N` once
complete; old ones are renamed away before they are deleted; the final adapter's files
are staged and renamed one by one, weights last. `--resume` reads a checkpoint's files
before trusting it and skips a damaged one.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import yaml

from qlora_cli.atomic import fsync_dir, fsync_tree
from qlora_cli.errors import ConfigError, ResourceError
from qlora_cli.model.adapters.registry import METHODS
from qlora_cli.recipe.loader import flatten, recipe_to_yaml, validate_recipe
from qlora_cli.rundir import CHECKPOINT_PREFIX, STAGING_PREFIX, TRASH_PREFIX, adapter_files, checkpoint_step

# What the Trainer needs to resume exactly: the adapter, optimizer + scheduler, RNG and trainer state
# (RNG: rng_state.pth from one process, rng_state_<rank>.pth from each of several).
REQUIRED_FILES = ("trainer_state.json", "scheduler.pt")
# Optimizer state: optimizer.pt (DDP / one process), optimizer.bin (FSDP through accelerate), global_step*/ (DeepSpeed).
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")
# The Trainer also pickles its TrainingArguments; resuming never reads it and recipe.yaml says it all.
DROPPED_FILES = ("training_args.bin",)
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _all_checkpoint_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    found = [(checkpoint_step(p), p) for p in Path(output_dir).glob(CHECKPOINT_PREFIX + "*") if p.is_dir()]
    return sorted((step, path) for step, path in found if step is not None)


def checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders that hold a trainer state, oldest first (no file is read)."""
    return [path for _, path in _all_checkpoint_dirs(output_dir) if (path / "trainer_state.json").is_file()]


def checkpoint_problem(path: Path) -> Optional[str]:
    """Why `path` cannot be resumed from (missing or unreadable file, non-finite weights), or None."""
    import torch
    from safetensors import SafetensorError, safe_open

    config_name, weights_name = adapter_files(path)
    for name in (*REQUIRED_FILES, config_name, weights_name):
        if not (path / name).is_file():
            return f"missing {name}"
    optimizer = [name for name in OPTIMIZER_FILES if (path / name).is_file()]
    if not optimizer and not any(path.glob("global_step*")):
        return "missing optimizer.pt"
    rng_files = sorted(p.name for p in path.glob("rng_state*.pth"))
    if not rng_files:
        return "missing rng_state.pth"
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        config = json.loads((path / config_name).read_text())
        if state["global_step"] != checkpoint_step(path):
            return f"trainer_state.json is for step {state['global_step']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable trainer_state.json or {config_name}"
    try:
        with safe_open(str(path / weights_name), framework="pt") as weights:
            for key in weights.keys():
                if not torch.isfinite(weights.get_tensor(key)).all():
                    return f"non-finite values in {weights_name} ({key})"
                rank = _lora_rank(config, key, weights)
                if rank is not None and rank != config.get("r"):
                    return f"{weights_name} holds rank-{rank} LoRA weights but {config_name} says r={config.get('r')}"
    except (OSError, SafetensorError, RuntimeError, ValueError):
        return f"unreadable {weights_name}"
    for name in (*optimizer, "scheduler.pt", *rng_files):
        try:  # torch.save writes a zip; a cut-off file has no central directory
            with zipfile.ZipFile(path / name) as archive:
                if not archive.namelist():
                    return f"empty {name}"
        except (OSError, zipfile.BadZipFile):
            return f"unreadable {name}"
    return None


def _lora_rank(config: dict, key: str, weights) -> Optional[int]:
    """The rank of a LoRA A matrix in a checkpoint (None for other tensors, or where ranks vary by pattern)."""
    if str(config.get("peft_type")).upper() != "LORA" or config.get("rank_pattern") or ".lora_A." not in key:
        return None
    return weights.get_slice(key).get_shape()[0]


def check_checkpoint_matches(path: Path, recipe) -> None:
    """Refuse, in one line, a checkpoint whose adapter is not the one the recipe trains (another
    method, rank, alpha, targets or bottleneck size): loading it would fail on shapes, or worse, fit."""
    config_name, _ = adapter_files(path)
    config = json.loads((path / config_name).read_text())
    expected = METHODS[recipe.adapter.method].peft_type
    found = str(config.get("peft_type") or "unknown").upper()
    if found != expected:
        differences = [f"adapter {found}, the recipe's {expected}"]
    elif found == "LORA":
        lora = recipe.lora
        pairs = [("r", config.get("r"), lora.r), ("lora_alpha", float(config.get("lora_alpha") or 0), float(lora.alpha)),
                 ("use_dora", bool(config.get("use_dora")), lora.use_dora)]
        if not isinstance(lora.target_modules, str):
            pairs.append(("target_modules", sorted(config.get("target_modules") or []), sorted(lora.target_modules)))
        differences = [f"{name} {ours!r} in the checkpoint, {theirs!r} in the recipe" for name, ours, theirs in pairs if ours != theirs]
    elif found == "BOTTLENECK":
        section = recipe.adapter.bottleneck
        pairs = [("size", config.get("size"), section.size), ("placement", config.get("placement"), list(section.placement))]
        differences = [f"{name} {ours!r} in the checkpoint, {theirs!r} in the recipe" for name, ours, theirs in pairs if ours != theirs]
    else:
        differences = []
    if differences:
        raise ConfigError(
            f"--resume: {path} does not match the recipe it would continue ({'; '.join(differences)}); it was written by "
            "another run: resume with that run's recipe, or start over with --force"
        )


def newest_intact(output_dir: Path) -> tuple[Optional[Path], list[str]]:
    """The newest checkpoint that passes `checkpoint_problem`, and one note per damaged newer one."""
    skipped = []
    for _, path in reversed(_all_checkpoint_dirs(output_dir)):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{path.name} ({problem})")
    return None, skipped


# What --resume may change: when to stop, the learning rate and its schedule (train/trainer.py puts them over
# the checkpoint's), when to log, evaluate and save, and how memory is spent. Anything else (batch,
# data, adapter, model, precision) the checkpoint's state or data position would contradict.
RESUMABLE_FIELDS = (
    "train.max_steps", "train.epochs", "train.learning_rate", "train.lr_scheduler", "train.warmup_ratio",
    "train.warmup_steps", "train.weight_decay", "train.max_grad_norm",
    "train.logging_steps", "train.eval_steps", "train.save_steps",
    "train.report_to", "train.gradient_checkpointing", "train.compile", "train.loss_kernel",
    "output.dir", "output.save_total_limit", "data.eval", "distributed.backend", "distributed.fsdp_cpu_offload",
)


def check_resumed_recipe(output_dir: Path, recipe) -> None:
    """Refuse to resume with a recipe that differs from the run's recipe.yaml outside RESUMABLE_FIELDS."""
    recorded_path = Path(output_dir) / "recipe.yaml"
    try:
        recorded = validate_recipe(yaml.safe_load(recorded_path.read_text(encoding="utf-8")))
    except (OSError, ValueError, ConfigError, yaml.YAMLError, TypeError):
        return  # no readable record (a run from an older version): nothing to compare with
    before, after = (flatten(yaml.safe_load(recipe_to_yaml(r))) for r in (recorded, recipe))
    changed = [key for key in sorted(before.keys() | after.keys())
               if before.get(key) != after.get(key) and not key.startswith(RESUMABLE_FIELDS)]
    if changed:
        shown = ", ".join(f"{key} {before.get(key)!r} -> {after.get(key)!r}" for key in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ConfigError(
            f"--resume continues {output_dir} as its recipe.yaml records it, but {shown}{more} changed, which its checkpoint's "
            f"state or data position would contradict; resume with only {', '.join(RESUMABLE_FIELDS)} "
            "changed, or start a new run with --set output.dir=NEW"
        )


def _discard(path: Path) -> None:
    """Rename then delete, so a kill mid-deletion leaves trash, never a half-deleted checkpoint."""
    trash = path.with_name(TRASH_PREFIX + path.name)
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def disk_error(what: str, exc: OSError, output_dir: Path) -> ResourceError:
    previous = newest_intact(output_dir)[0] if Path(output_dir).is_dir() else None
    kept = f"{previous.name} is intact" if previous else "no earlier checkpoint exists"
    reason = exc.strerror or str(exc)
    return ResourceError(
        f"cannot write {what} in {output_dir}: {reason}; {kept}. Free some disk space (or fix permissions), then `qlora train {output_dir} --resume`"
    )


@contextmanager
def disk_errors(what: str, output_dir: Path) -> Iterator[None]:
    """Turn a full disk / read-only / permission OSError while writing `what` into a one-line ResourceError."""
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_ERRNOS:
            raise disk_error(what, exc, output_dir) from exc
        raise


@contextmanager
def staged_checkpoint(
    output_dir: Path, step: int, save_total_limit: Optional[int], is_main: bool = True, barrier: Callable[[], None] = lambda: None
) -> Iterator[Path]:
    """Yield a staging root; the Trainer writes `<root>/checkpoint-N` there, which is then
    renamed to `output_dir/checkpoint-N` and the oldest checkpoints beyond the limit removed.

    With several processes, each writes its part into the same staging root and the main one,
    once all are done (`barrier`), publishes it."""
    output_dir = Path(output_dir)
    name = f"{CHECKPOINT_PREFIX}{step}"
    staging = output_dir / f"{STAGING_PREFIX}{name}"
    try:
        if is_main:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir()
        barrier()
        yield staging
        barrier()
        if is_main:
            built = staging / name
            for dropped in DROPPED_FILES:
                (built / dropped).unlink(missing_ok=True)
            fsync_tree(built)
            final = output_dir / name
            if final.exists():  # a damaged leftover of the same step, from before a resume
                _discard(final)
            os.rename(built, final)
            fsync_dir(output_dir)
    except OSError as exc:
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        if exc.errno in DISK_ERRNOS:
            raise disk_error(name, exc, output_dir) from exc
        raise
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)
        if save_total_limit:
            for _, old in _all_checkpoint_dirs(output_dir)[:-save_total_limit]:
                _discard(old)
    barrier()


def publish_adapter(adapter, tokenizer, output_dir: Path, state_dict: Optional[dict] = None) -> None:
    """Write the final adapter and tokenizer: staged in full, then renamed into place file by file,
    the old weights taken away first and the new weights put in last, so whenever
    `adapter_model.safetensors` exists the files beside it belong to it. A kill in between leaves
    no weights file (the run looks unfinished; `--resume` rewrites it from the last checkpoint)."""
    output_dir = Path(output_dir)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX + "saving-", dir=output_dir))
    try:
        with disk_errors("the final adapter", output_dir):
            if state_dict is not None:  # gathered from FSDP shards
                adapter.model.save_pretrained(staging, safe_serialization=True, state_dict=state_dict)
            else:
                adapter.save(staging)  # peft adapters, or our own (bottleneck)
            tokenizer.save_pretrained(staging)
            fsync_tree(staging)
            weights = adapter_files(staging)[1]
            (output_dir / weights).unlink(missing_ok=True)
            for item in sorted(staging.iterdir(), key=lambda p: p.name == weights):
                os.replace(item, output_dir / item.name)
            fsync_dir(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
