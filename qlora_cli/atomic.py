"""Atomic file writes for run directories: a reader (or a crash) sees the old file or the
new one, never a torn one."""

from __future__ import annotations

import os
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to a sibling temporary file, flush it to disk, then rename it over `path`.

    On failure (a full disk) the temporary file is removed and `path` is left as it was."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        with open(temporary, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
