"""The user-facing error hierarchy.

Library code raises these with a message that says what went wrong and what to do (quoting a
library's own exception through library_message); cli/console.py turns them into one line on
stderr and a non-zero exit code (see EXIT_CODES).
"""

from __future__ import annotations


class QloraError(Exception):
    """Base class: a problem the user can fix. Never shown with a traceback."""

    exit_code = 1


class ConfigError(QloraError):
    """The recipe or a command-line option is invalid."""

    exit_code = 2


class DataError(QloraError):
    """The dataset is missing, malformed, or yields nothing to train on."""

    exit_code = 3


class ModelError(QloraError):
    """The model, adapter or tokenizer cannot be loaded or combined."""

    exit_code = 4


class ResourceError(QloraError):
    """Not enough memory or disk, or an output location is in the way."""

    exit_code = 5


class VerificationError(QloraError):
    """A result failed its own check (e.g. merged outputs drift from the adapter's)."""

    exit_code = 6


class TrainingError(QloraError):
    """Training stopped on a condition the user must look at (e.g. a NaN loss)."""

    exit_code = 7


EXIT_CODES = {
    0: "success",
    1: "unexpected error (run again with --debug for the traceback)",
    2: "invalid recipe or option (ConfigError)",
    3: "bad or empty dataset (DataError)",
    4: "model, adapter or tokenizer problem (ModelError)",
    5: "not enough memory/disk, output directory unwritable, in the way or being written by another process, or disk full while saving (ResourceError)",
    6: "a verification failed, e.g. merge drift (VerificationError)",
    7: "training stopped: loss or adapter weights became NaN/inf; the last good checkpoint is kept (TrainingError)",
    130: "interrupted (Ctrl-C or SIGTERM); a checkpoint was saved where possible",
}


_LONGEST_LINE = 1000  # a library message longer than this is cut at a word boundary


def library_message(exc: BaseException) -> str:
    """A library exception as one whole line for our messages: its first non-blank line, never cut
    mid-word (a long one ends at a word boundary with "..."), or its type name when it says nothing
    (datasets raises a bare StopIteration for an empty file)."""
    line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "") or type(exc).__name__
    if len(line) > _LONGEST_LINE:
        line = line[:_LONGEST_LINE].rsplit(" ", 1)[0] + " ..."
    return line
