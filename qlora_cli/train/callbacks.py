"""Trainer callbacks of a run: the rich progress display, metrics.json, and stopping
cleanly (with a checkpoint) on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import json
import math
import resource
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import TrainerCallback

from qlora_cli.atomic import write_text_atomic
from qlora_cli.errors import TrainingError
from qlora_cli.train.checkpointing import newest_intact
from qlora_cli.train.distributed import any_rank, world


def peak_memory_gib() -> float:
    """Peak memory of this process: CUDA allocated on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


class TokenMeter(TrainerCallback):
    """Non-padding tokens seen, fed by the trainer at every micro-batch.

    The running total lives in `state.num_input_tokens_seen`, so it is checkpointed and a
    resumed run continues the count; the rate covers this session only.
    """

    def __init__(self):
        self.tokens = 0
        self.session_tokens = 0
        self.session_start = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens = state.num_input_tokens_seen or 0
        self.session_tokens = 0
        self.session_start = time.perf_counter()

    def add(self, count: int, state) -> None:
        self.tokens += count
        self.session_tokens += count
        state.num_input_tokens_seen = self.tokens

    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.session_start
        return self.session_tokens / elapsed if elapsed > 0 else 0.0


class ProgressDisplay(TrainerCallback):
    """A live progress bar on a terminal, and one line per logging step everywhere."""

    def __init__(self, meter: TokenMeter, console: Optional[Console] = None, enabled: bool = True):
        self.meter = meter
        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.progress: Optional[Progress] = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if not (self.enabled and state.is_world_process_zero):
            return
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, status="")

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, status=f"{self.meter.tokens_per_second():,.0f} tok/s")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not (self.enabled and state.is_world_process_zero) or not logs:
            return
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key, label, fmt in (("loss", "loss", ".4f"), ("eval_loss", "eval_loss", ".4f"), ("learning_rate", "lr", ".2e"), ("grad_norm", "grad_norm", ".3f")):
            if key in logs and isinstance(logs[key], (int, float)):
                parts.append(f"{label} {logs[key]:{fmt}}")
        if "loss" in logs or "eval_loss" in logs:
            parts.append(f"{self.meter.tokens_per_second():,.0f} tok/s")
            self.console.print("  ".join(parts), highlight=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class NonFiniteLossGuard(TrainerCallback):
    """Stop at the first NaN/inf loss (QloraTrainer checks every micro-batch; a logged loss is a
    second net) or non-finite adapter weights, before anything from that step is saved."""

    def __init__(self):
        self.bad_step: Optional[int] = None
        self.what = "loss"

    def trip(self, step: int, what: str, control) -> None:
        if self.bad_step is None:
            self.bad_step, self.what = step, what
        control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        loss = (logs or {}).get("loss")
        if isinstance(loss, float) and not math.isfinite(loss):
            self.trip(state.global_step, "loss", control)

    def raise_if_tripped(self, output_dir: Path) -> None:
        if self.bad_step is None:
            return
        last_checkpoint = newest_intact(output_dir)[0]  # read here, only once tripped: it reads every checkpoint's files
        if last_checkpoint is not None:
            kept = f"the last good checkpoint {last_checkpoint.name} is intact (`qlora train {last_checkpoint.parent} --resume` continues from it)"
        else:
            kept = "no checkpoint had been saved before it"
        raise TrainingError(
            f"{self.what} became NaN/inf at step {self.bad_step}; training stopped and nothing from that step was saved; {kept}. "
            "Usual causes: fp16 overflow (start a new run with model.dtype bfloat16 or float32), a learning rate too high (--resume with a lower "
            "--set train.learning_rate), "
            "or a bad data row"
        )


class StopOnSignal(TrainerCallback):
    """First Ctrl-C (or SIGTERM): save a checkpoint at the end of the current step and stop."""

    def __init__(self):
        self.requested = False
        self._first = 0.0
        self._previous = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        now = time.monotonic()
        # A second signal means "now", except the echo a launcher (torchrun) sends right after
        # the terminal's own Ctrl-C reached every process.
        if self.requested and not (world().distributed and now - self._first < 5):
            raise KeyboardInterrupt
        if not self.requested:
            self.requested, self._first = True, now

    def on_step_end(self, args, state, control, **kwargs):
        # Every rank must stop after the same step, or the others wait forever in a collective.
        if any_rank(self.requested, args.device):
            self.requested = True
            control.should_save = True
            control.should_training_stop = True


def write_metrics(path: Path, state, meter: TokenMeter, extra: dict) -> dict:
    """metrics.json: the loss per logged step plus totals, written atomically."""
    train_logs = [entry for entry in state.log_history if "loss" in entry]
    eval_logs = [entry for entry in state.log_history if "eval_loss" in entry]
    metrics = {
        "global_step": state.global_step,
        "max_steps": state.max_steps,
        "first_loss": train_logs[0]["loss"] if train_logs else None,
        "last_loss": train_logs[-1]["loss"] if train_logs else None,
        "eval_loss": eval_logs[-1]["eval_loss"] if eval_logs else None,
        "tokens_seen": meter.tokens,
        "tokens_per_second": round(meter.tokens_per_second(), 2),
        "peak_memory_gib": round(peak_memory_gib(), 3),
        **extra,
        "log_history": state.log_history,
    }
    write_text_atomic(path, json.dumps(metrics, indent=2) + "\n")
    return metrics
