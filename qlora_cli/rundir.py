"""The run directory, owned here: the names of what `qlora train` writes into it, whether a folder
is one, what in it is foreign, leftovers of a killed run, the adapter's config inside it, the
guard that lets `--force` replace only a run directory, and the lock that gives a folder one
writer at a time (train, merge --output, evaluate).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from qlora_cli.errors import ModelError, ResourceError

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = ".tmp-"  # .tmp-checkpoint-N/, .tmp-saving-*/: never matched by checkpoint-*
TRASH_PREFIX = ".trash-"
LOCK_NAME = ".qlora.lock"  # held (flock) by the one process writing the folder; see writer_lock
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
    "merges.txt", "added_tokens.json", "tensorboard", "wandb", LOCK_NAME,
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
        raise ModelError(
            stopped_run(adapter_dir) or f"no adapter in {adapter_dir} (adapter_config.json missing); train one with `qlora train` or point at a finished run"
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file} is not readable JSON ({exc}); the run directory is damaged") from None
    if not any((Path(adapter_dir) / name).is_file() for name in (ADAPTER_WEIGHTS, "adapter_model.bin")):
        raise ModelError(stopped_run(adapter_dir) or f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors; the run did not finish saving")
    return config


def stopped_run(folder: Path) -> Optional[str]:
    """For a run directory whose run stopped (Ctrl-C, SIGTERM, a kill) before its final adapter was
    saved: a message saying so and how to finish it; None for any other folder."""
    found = (checkpoint_step(path) for path in Path(folder).glob(CHECKPOINT_PREFIX + "*") if path.is_dir())
    steps = sorted(step for step in found if step is not None)
    if not steps or not (Path(folder) / "recipe.yaml").is_file():
        return None
    return (f"{folder} holds no final adapter: its run stopped at step {steps[-1]} ({CHECKPOINT_PREFIX}{steps[-1]} saved); "
            f"finish it with `qlora train {folder} --resume`, then run this again")


def read_bottleneck_config(folder: Path) -> Optional[dict]:
    """The bottleneck config of `folder`, or None when it holds no bottleneck adapter."""
    config_file = Path(folder) / BOTTLENECK_CONFIG
    if not config_file.is_file():
        return None
    try:
        return json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ModelError(f"{config_file} is not readable JSON ({exc}); the run directory is damaged") from None


_HELD: set[str] = set()  # lock files this process holds


def entries(folder: Path) -> list[Path]:
    """What a folder holds, its writer's lock file aside (a locked empty folder is empty)."""
    return [item for item in Path(folder).iterdir() if item.name != LOCK_NAME]


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"{}")
        return f"pid {info['pid']} (`{info['command']}`)"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _try_lock(path: Path, what: str) -> int:
    """An open descriptor of `path` holding its exclusive flock; a ResourceError naming the holder if taken."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ResourceError(
                f"{path.parent} is being written by {holder}; {what} would mix its files with that run's: wait for it to "
                "finish (or stop it), or choose another folder"
            ) from None
        try:  # the file locked must still be the one at `path`: a finishing holder removes it
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            return fd
        os.close(fd)


def check_unlocked(folder: Path, what: str) -> None:
    """A ResourceError if another process is writing `folder` now (a stale lock, its holder gone, is no obstacle)."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file() or str(path.resolve()) in _HELD:
        return
    fd = _try_lock(path, what)
    os.close(fd)  # released at once: only asked


@contextmanager
def writer_lock(folder: Path, what: str) -> Iterator[None]:
    """Hold `folder`'s lock for the block: an exclusive flock on `folder/.qlora.lock`, released by the
    kernel when the process dies (even by SIGKILL), so a lock left behind by a dead holder is taken
    over silently. A second writer gets one line naming the holder's pid and command. A folder made
    here only to hold the lock is removed again if the block leaves nothing in it."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ResourceError(f"{folder} is a file, not a folder; choose a folder path")
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = _try_lock(path, what)
    key = str(path.resolve())
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": "qlora " + " ".join(sys.argv[1:])}).encode())
        _HELD.add(key)
        yield
    finally:
        _HELD.discard(key)
        try:  # remove the lock file only if it is still ours (a merge replaces the folder that held it)
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                path.unlink()
        except FileNotFoundError:
            pass
        os.close(fd)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
