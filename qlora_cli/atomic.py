"""Atomic writes of files and folders: a reader (or a crash) sees the old file or folder or the
new one, never a torn one. Checkpoints (train/checkpointing.py), merged models and the demo model
are written through these."""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def write_atomic(path: Path, write: Callable[[Path], object]) -> Path:
    """`write(temporary)` into a sibling temporary file, flush it to disk, then rename it over `path`.

    On failure (a full disk) the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: Path, text: str) -> Path:
    """`text` written to `path` atomically (see write_atomic)."""
    return write_atomic(path, lambda temporary: temporary.write_text(text))


def fsync_tree(folder: Path) -> None:
    """Flush file contents before the rename that publishes them (survives a power cut, not only a kill)."""
    for item in Path(folder).rglob("*"):
        if item.is_file():
            with open(item, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_dir(folder)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _readable_by_umask(folder: Path) -> None:
    # mkdtemp creates 0700, and transformers writes shards through 0600 temporary files.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def remove_stale_stagings(final: Path, purpose: str, keep: Path) -> list[Path]:
    """Delete the staging and `replaced` folders of `final` that earlier, killed writers left
    (`.NAME.PURPOSE-*`, `.NAME.replaced-*`; a SIGKILL or power cut runs no cleanup), all but
    `keep`; returns what was removed. Only while the caller holds `final`'s writer lock
    (rundir.writer_lock): then no other process is writing them."""
    final, keep = Path(final), Path(keep)
    removed = []
    for prefix in (f".{final.name}.{purpose}-", f".{final.name}.replaced-"):
        for item in final.parent.glob(glob.escape(prefix) + "*"):
            # mkdtemp's suffix has no dot: `.NAME.merging-x.merging-*` belongs to another folder
            if item != keep and "." not in item.name[len(prefix):] and item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)
                removed.append(item)
    return removed


@contextmanager
def staged_folder(final: Path, purpose: str) -> Iterator[Path]:
    """Yield a hidden sibling of `final` (`.NAME.PURPOSE-*`) to write a whole folder into. When the
    block ends, its files are flushed and it is renamed to `final`; an existing `final` is renamed
    away first and deleted after. On an error or an interrupt the staging folder is removed and
    `final` is left as it was."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.{purpose}-", dir=final.parent))
    try:
        yield staging
        _readable_by_umask(staging)
        fsync_tree(staging)
        if final.exists():
            replaced = Path(tempfile.mkdtemp(prefix=f".{final.name}.replaced-", dir=final.parent))
            os.replace(final, replaced / final.name)
            os.replace(staging, final)
            shutil.rmtree(replaced, ignore_errors=True)
        else:
            os.replace(staging, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
