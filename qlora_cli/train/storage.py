"""Can the output directory take the run? A write probe and a free-space check against the
size of the checkpoints the run will keep, done before training starts."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

from qlora_cli.errors import ResourceError
from qlora_cli.estimate.memory import Trainable, optimizer_state_bytes
from qlora_cli.recipe.schema import Recipe

# The trainable tensors and their optimizer states are sized by the estimate's rules
# (estimate/memory.py), one model of the optimizer for memory and for disk. The tokenizer each
# checkpoint carries is sized from the run's own (saved_size: 3.5 MB for SmolLM2, 17 MB for
# Llama 3). The rest is small: trainer_state.json, scheduler.pt, rng_state.pth, the adapter's
# config and README, ~40 kB measured on SmolLM2; 1 MiB covers them with a trainer state of
# LOGGED_STEPS_COVERED logged steps, and each step logged beyond those adds LOG_ENTRY_BYTES.
OVERHEAD_BYTES = 2**20
LOGGED_STEPS_COVERED = 2000
LOG_ENTRY_BYTES = 400  # one log_history entry of trainer_state.json (loss, grad_norm, lr, tokens...), with indentation


def existing_ancestor(path: Path) -> Path:
    """The nearest folder of `path` (itself included) that exists: where it would be created."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def probe_writable(output_dir: Path, option: str = "output.dir") -> None:
    """Create and delete a file where the run (or merge: `option` "--output") will write: the only
    test that holds for root, read-only mounts, /proc and network filesystems alike."""
    target = existing_ancestor(output_dir)
    if not target.is_dir():
        raise ResourceError(f"{option} {output_dir}: {target} is a file, not a directory; choose another {option}")
    try:
        fd, name = tempfile.mkstemp(prefix=".tmp-probe-", dir=target)
        try:
            os.write(fd, b"qlora")
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(name).unlink(missing_ok=True)  # another rank's leftover sweep may have removed it
    except OSError as exc:
        raise ResourceError(
            f"{option} {output_dir}: cannot write in {target} (not writable: {exc.strerror or exc}); fix its permissions or choose another {option}"
        ) from None


def trainable_tensors(model) -> list[Trainable]:
    """The tensors the optimizer updates, as they are stored."""
    return [Trainable(name, param.numel(), 1, param.element_size()) for name, param in model.named_parameters() if param.requires_grad]


def adapter_bytes(tensors: list[Trainable]) -> int:
    return sum(t.numel * t.count * t.bytes_per_element for t in tensors)


def saved_size(tokenizer) -> int:
    """Bytes the tokenizer's files take in each checkpoint and beside the final adapter: saved once
    into a temporary folder and measured (a tokenizer that cannot be saved there counts 16 MiB)."""
    try:
        with tempfile.TemporaryDirectory(prefix="qlora-tokenizer-size-") as folder:
            tokenizer.save_pretrained(folder)
            return _size_of(Path(folder))
    except Exception:  # noqa: BLE001 - an estimate must not stop the run; the Trainer's own save reports real errors
        return 16 * 2**20


def log_bytes(recipe: Recipe) -> int:
    """What trainer_state.json grows by beyond OVERHEAD_BYTES: its log_history of a long run."""
    train = recipe.train
    logged = (train.max_steps or 0) // max(train.logging_steps, 1)
    return max(0, logged - LOGGED_STEPS_COVERED) * LOG_ENTRY_BYTES


def checkpoint_bytes(tensors: list[Trainable], optimizer: str, small_files: int = OVERHEAD_BYTES) -> int:
    """Expected size of one checkpoint: adapter weights + optimizer state + the small files
    (tokenizer, trainer state, scheduler, RNG, configs)."""
    return adapter_bytes(tensors) + optimizer_state_bytes(tensors, optimizer) + small_files


def _readable(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _size_of(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir() else 0


def required_bytes(recipe: Recipe, tensors: list[Trainable], tokenizer_bytes: int = 0) -> int:
    """Disk the run still needs: the checkpoints it keeps (plus the one being written) and the final adapter."""
    train = recipe.train
    saves = math.ceil(train.max_steps / train.save_steps) if train.max_steps else recipe.output.save_total_limit
    kept = min(recipe.output.save_total_limit, saves) + 1
    small_files = OVERHEAD_BYTES + tokenizer_bytes + log_bytes(recipe)
    return kept * checkpoint_bytes(tensors, train.optimizer, small_files) + adapter_bytes(tensors) + OVERHEAD_BYTES + tokenizer_bytes


def check_free_space(recipe: Recipe, tensors: list[Trainable], reclaimable: bool = False, tokenizer_bytes: int = 0) -> None:
    """ResourceError when the disk under output.dir cannot hold what the run will write.

    What the run directory already holds counts as used by the run (a resumed run's
    checkpoints), or as freed when `reclaimable` (--force deletes it first)."""
    output_dir = Path(recipe.output.dir)
    target = existing_ancestor(output_dir)
    free = shutil.disk_usage(target).free
    already = _size_of(output_dir)
    need = required_bytes(recipe, tensors, tokenizer_bytes) - (0 if reclaimable else already)
    available = free + (already if reclaimable else 0)
    if need > available:
        raise ResourceError(
            f"not enough disk space for output.dir {output_dir}: the run needs about {need / 2**30:.2f} GiB "
            f"(checkpoints of {_readable(checkpoint_bytes(tensors, recipe.train.optimizer, OVERHEAD_BYTES + tokenizer_bytes))} each, "
            f"{recipe.output.save_total_limit} kept), {available / 2**30:.2f} GiB free; free some space, lower "
            "output.save_total_limit, or choose another output.dir"
        )
