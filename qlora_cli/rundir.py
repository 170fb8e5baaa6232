"""The run directory, owned here: the names of what `qlora train` writes into it, whether a folder
is one, what in it is foreign, leftovers of a killed run, the adapter's config inside it, and the
guard that lets `--force` replace only a run directory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

from qlora_cli.errors import ModelError, ResourceError

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".tmp-"  # .tmp-checkpoint-N/, .tmp-saving-*/: never matched by checkpoint-*
TRASH_PREFIX = ".trash-"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
BOTTLENECK_CONFIG = "bottleneck_config.json"
BOTTLENECK_WEIGHTS = "bottleneck_model.safetensors"
# The adapter: peft's files, or those of our bottleneck adapter (model/adapters/bottleneck.py).
ADAPTER_FILES = {"peft": (ADAPTER_CONFIG, ADAPTER_WEIGHTS), "bottleneck": (BOTTLENECK_CONFIG, BOTTLENECK_WEIGHTS)}


def adapter_files(folder: Path) -> tuple[str, str]:
    """(config, weights) file names of the adapter saved in `folder`."""
    return ADAPTER_FILES["bottleneck" if (Path(folder) / ADAPTER_FILES["bottleneck"][0]).is_file() else "peft"]


def checkpoint_step(path: Path) -> Optional[int]:
    step = path.name[len(CHECKPOINT_PREFIX):]
    return int(step) if path.name.startswith(CHECKPOINT_PREFIX) and step.isdigit() else None


# What `qlora train` writes into a run directory (besides checkpoint-N/ and its own leftovers):
# --force clears a directory only when it holds nothing else.
RUN_ENTRIES = {
    "recipe.yaml", "metrics.json", "loss.png", "eval.json", "README.md", "adapter_config.json", ADAPTER_WEIGHTS,
    *ADAPTER_FILES["bottleneck"], "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.json",
    "merges.txt", "added_tokens.json", "tensorboard", "wandb",
}


def is_run_dir(path: Path) -> bool:
    """A folder `qlora train` wrote (not just any folder holding a recipe.yaml, such as a project's
    own, which must never become an output.dir that --force would clear)."""
    written = ("metrics.json", *(names[0] for names in ADAPTER_FILES.values()))
    return any((path / name).is_file() for name in written) or any(child.is_dir() for child in path.glob(CHECKPOINT_PREFIX + "*"))


def foreign_entries(output_dir: Path) -> list[str]:
    """Names in `output_dir` that no `qlora train` run wrote (a user's files, a merged model...)."""
    return sorted(
        item.name for item in Path(output_dir).iterdir()
        if item.name not in RUN_ENTRIES and not item.name.endswith(".tmp")
        and not item.name.startswith((CHECKPOINT_PREFIX, STAGING_PREFIX, TRASH_PREFIX, "tokenizer"))
    )


def remove_leftovers(output_dir: Path) -> None:
    """Delete what a killed run left half-written: staging folders, trash, temporary files."""
    for item in Path(output_dir).iterdir():
        if item.name.startswith((STAGING_PREFIX, TRASH_PREFIX)) or item.name.endswith(".tmp"):
            if item.is_dir() and not item.is_symlink():
                shutil.rmtree(item, ignore_errors=True)  # every rank of a multi-process run may be at it
            else:
                item.unlink(missing_ok=True)


def holds_cwd(folder: Path) -> bool:
    """Whether deleting `folder` would delete the current directory (the guard of every --force)."""
    return Path.cwd().resolve().is_relative_to(Path(folder).resolve())


def check_replaceable(output_dir: Path) -> None:
    """--force deletes output.dir: only a run directory, never one holding the user's own files or the working directory."""
    if holds_cwd(output_dir):
        raise ResourceError(f"output.dir {output_dir} holds the current directory, which --force would delete; choose another output.dir")
    foreign = foreign_entries(output_dir)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ResourceError(
            f"--force replaces a run directory, but output.dir {output_dir} also holds {', '.join(foreign[:3])}{more}, which "
            "qlora train did not write; move them out or choose another output.dir (--set output.dir=NEW)"
        )


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's config (peft's, or our bottleneck adapter's), or a ModelError saying what is missing."""
    settings = read_bottleneck_config(adapter_dir)
    if settings is not None:
        if not (Path(adapter_dir) / BOTTLENECK_WEIGHTS).is_file():
            raise ModelError(f"{adapter_dir} has {BOTTLENECK_CONFIG} but no {BOTTLENECK_WEIGHTS}; the run did not finish saving")
        return settings
    config_file = Path(adapter_dir) / ADAPTER_CONFIG
    if not config_file.is_file():
        raise ModelError(f"no adapter in {adapter_dir} (adapter_config.json missing); train one with `qlora train` or point at a finished run")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file} is not readable JSON ({exc}); the run directory is damaged") from None
    if not any((Path(adapter_dir) / name).is_file() for name in (ADAPTER_WEIGHTS, "adapter_model.bin")):
        raise ModelError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors; the run did not finish saving")
    return config


def read_bottleneck_config(folder: Path) -> Optional[dict]:
    """The bottleneck config of `folder`, or None when it holds no bottleneck adapter."""
    config_file = Path(folder) / BOTTLENECK_CONFIG
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file} is not readable JSON ({exc}); the run directory is damaged") from None
