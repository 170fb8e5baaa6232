"""What every command shares: the two rich consoles, the `--debug` switch, and the wrapper that
turns a QloraError, Ctrl-C or SIGTERM into one line on stderr and an exit code."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
from typing import Callable, Iterator

import typer
from rich.console import Console
from rich.table import Table

from qlora_cli.errors import QloraError

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)
state = {"debug": False}

SetOption = typer.Option(None, "--set", help="Override a recipe field, e.g. --set train.learning_rate=1e-4 (repeatable).")
JsonOption = typer.Option(False, "--json", help="Print one JSON object for machines instead of tables.")


def quiet_libraries() -> None:
    """Keep library chatter (progress bars of loaders, deprecation notes) out of our output.

    Done through environment variables read at import time, so no heavy library is imported
    here (estimate must answer in well under two seconds).
    """
    for name, value in (
        ("TOKENIZERS_PARALLELISM", "false"),
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("DATASETS_VERBOSITY", "error"),
        ("HF_DATASETS_DISABLE_PROGRESS_BARS", "1"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("HF_HUB_VERBOSITY", "error"),  # its retry notices ("Retrying in 1s") when the hub is unreachable
    ):
        os.environ.setdefault(name, value)
    # Libraries imported before us (a host program, a test session) no longer read those variables.
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].logging.set_verbosity_error()
    if "huggingface_hub" in sys.modules:
        sys.modules["huggingface_hub"].utils.logging.set_verbosity_error()
    if "transformers" in sys.modules:
        sys.modules["transformers"].logging.set_verbosity_error()
        sys.modules["transformers"].logging.disable_progress_bar()
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*paged.*")


def one_line(message: str) -> str:
    """The message as one printable line, safe from rich markup: a key or value quoted from a
    recipe may hold line breaks (\\n, \\x85, \\u2028), control characters or `[brackets]`."""
    from rich.markup import escape

    return escape("".join(char if char.isprintable() else repr(char)[1:-1] for char in message))


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_ctrl_c() -> Iterator[None]:
    """SIGTERM (a `kill`, a scheduler's stop, a container shutting down) handled as Ctrl-C: the
    command unwinds, so staging folders and locks are cleaned up, and exits 130 as documented,
    instead of dying with 143 and leaving them behind. `qlora train` puts its own handler over
    this one while it fits (a checkpoint first, then stop)."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def handle_errors(command: Callable) -> Callable:
    """Run a command; turn a QloraError, Ctrl-C or SIGTERM into one line and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            if not state["debug"]:
                quiet_libraries()
            with sigterm_as_ctrl_c():
                return command(*args, **kwargs)
        except QloraError as exc:
            if state["debug"]:
                raise
            err.print(f"[bold red]error:[/] {one_line(str(exc))}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper


def kv_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False, title_justify="left", box=None, pad_edge=False)
    table.add_column(style="bold cyan")
    table.add_column()
    for key, value in rows.items():
        table.add_row(str(key), f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    return table
