"""One rule for what a recipe's `model.path`, `data.train` or an estimate's model name means:
a path on disk, or a hub id (`org/name`)."""

from __future__ import annotations

import os
from pathlib import Path


def is_local_path(name: str, file_suffixes: tuple[str, ...] = ()) -> bool:
    """Whether `name` is a path on disk, or clearly meant as one (then a missing one is an error
    here, not a failed download): it exists, starts with `.`, `/` or `~`, has more than one `/`
    or an empty part, or ends with one of `file_suffixes` (`data.json`, `config.json`)."""
    if Path(name).expanduser().exists():
        return True
    parts = name.split("/")
    return (
        name.startswith((".", "/", "~")) or len(parts) > 2 or not all(parts)
        or (os.sep == "\\" and "\\" in name) or Path(name).suffix.lower() in file_suffixes
    )
