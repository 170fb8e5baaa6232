"""Experiment trackers (`train.report_to`): the Trainer's own TensorBoard and Weights & Biases
callbacks, checked before anything heavy is loaded and pointed into the run directory.

TensorBoard event files go to RUN_DIR/tensorboard (unless TENSORBOARD_LOGGING_DIR is set);
wandb runs offline (WANDB_MODE=offline unless set) into RUN_DIR/wandb (unless WANDB_DIR is set),
to upload later with `wandb sync`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from qlora_cli.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"
_set_by_us: dict[str, str] = {}  # environment variables this module set, so a later run may move them


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _set_default(name: str, value: str) -> None:
    """Set an environment variable unless the user did."""
    if name not in os.environ or _set_by_us.get(name) == os.environ[name]:
        os.environ[name] = value
        _set_by_us[name] = value


def prepare(report_to: list[str], output_dir: Path) -> None:
    """Check that each tracker is installed and set up its environment; call before building the Trainer."""
    if "tensorboard" in report_to and not (_installed("tensorboard") or _installed("tensorboardX")):
        raise ConfigError("train.report_to: tensorboard is not installed; pip install tensorboard, or remove it from report_to")
    if "wandb" in report_to:
        if not _installed("wandb"):
            raise ConfigError("train.report_to: wandb is not installed; pip install wandb, or remove it from report_to")
        _set_default("WANDB_MODE", "offline")
        _set_default("WANDB_DIR", str(Path(output_dir).resolve()))


def point_into_run(trainer, output_dir: Path) -> None:
    """Send the TensorBoard callback's event files to RUN_DIR/tensorboard (the Trainer's default is RUN_DIR/runs/DATE_HOST)."""
    from transformers.integrations import TensorBoardCallback

    if os.environ.get("TENSORBOARD_LOGGING_DIR"):
        return
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            callback.logging_dir = str(Path(output_dir) / TENSORBOARD_DIR)
