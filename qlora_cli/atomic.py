"""Atomic file writes for run directories: a reader (or a crash) sees the old file or the
new one, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


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
