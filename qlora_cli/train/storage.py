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
# (estimate/memory.py), one model of the optimizer for memory and for disk.
# Tokenizer, RNG, scheduler and trainer state: a few MB for the models we know.
OVERHEAD_BYTES = 64 * 2**20


def existing_ancestor(path: Path) -> Path:
    """The nearest folder of `path` (itself included) that exists: where it would be created."""
    path = Path(path).resolve()
    while not path.exists():
        path = path.parent
    return path


def probe_writable(output_dir: Path) -> None:
    """Create and delete a file where the run will write: the only test that holds for root,
    read-only mounts and network filesystems alike."""
    target = existing_ancestor(output_dir)
    if not target.is_dir():
        raise ResourceError(f"output.dir {output_dir}: {target} is a file, not a directory; choose another output.dir")
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
            f"output.dir {output_dir}: cannot write in {target} ({exc.strerror or exc}); fix its permissions or choose another output.dir"
        ) from None


def trainable_tensors(model) -> list[Trainable]:
    """The tensors the optimizer updates, as they are stored."""
    return [Trainable(name, param.numel(), 1, param.element_size()) for name, param in model.named_parameters() if param.requires_grad]


def adapter_bytes(tensors: list[Trainable]) -> int:
    return sum(t.numel * t.count * t.bytes_per_element for t in tensors)


def checkpoint_bytes(tensors: list[Trainable], optimizer: str) -> int:
    """Expected size of one checkpoint: adapter weights + optimizer state + the small files."""
    return adapter_bytes(tensors) + optimizer_state_bytes(tensors, optimizer) + OVERHEAD_BYTES


def _size_of(path: Path) -> int:
    return sum(item.stat().st_size for item in path.rglob("*") if item.is_file()) if path.is_dir() else 0


def required_bytes(recipe: Recipe, tensors: list[Trainable]) -> int:
    """Disk the run still needs: the checkpoints it keeps (plus the one being written) and the final adapter."""
    train = recipe.train
    saves = math.ceil(train.max_steps / train.save_steps) if train.max_steps else recipe.output.save_total_limit
    kept = min(recipe.output.save_total_limit, saves) + 1
    return kept * checkpoint_bytes(tensors, train.optimizer) + adapter_bytes(tensors) + OVERHEAD_BYTES


def check_free_space(recipe: Recipe, tensors: list[Trainable], reclaimable: bool = False) -> None:
    """ResourceError when the disk under output.dir cannot hold what the run will write.

    What the run directory already holds counts as used by the run (a resumed run's
    checkpoints), or as freed when `reclaimable` (--force deletes it first)."""
    output_dir = Path(recipe.output.dir)
    target = existing_ancestor(output_dir)
    free = shutil.disk_usage(target).free
    already = _size_of(output_dir)
    need = required_bytes(recipe, tensors) - (0 if reclaimable else already)
    available = free + (already if reclaimable else 0)
    if need > available:
        raise ResourceError(
            f"not enough disk space for output.dir {output_dir}: the run needs about {need / 2**30:.2f} GiB "
            f"(checkpoints of {checkpoint_bytes(tensors, recipe.train.optimizer) / 2**30:.2f} GiB each, "
            f"{recipe.output.save_total_limit} kept), {available / 2**30:.2f} GiB free; free some space, lower "
            "output.save_total_limit, or choose another output.dir"
        )
