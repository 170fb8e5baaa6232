"""The `qlora` Typer app: one command per module beside this one, registered here.

User mistakes (QloraError) become one line on stderr and the exit code in errors.EXIT_CODES;
`--debug` shows the traceback instead (cli/console.py).
"""

from __future__ import annotations

import typer

from qlora_cli.cli import estimate, evaluate, generate, init, merge, misc, report, train, validate
from qlora_cli.cli.console import handle_errors, state

app = typer.Typer(
    name="qlora",
    help="Fine-tune LLMs with LoRA / QLoRA from YAML recipes: train, evaluate, merge, estimate.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show full tracebacks and library logs.")) -> None:
    """qlora: LoRA / QLoRA fine-tuning from YAML recipes."""
    state["debug"] = debug


# (name, function, wrapped in the one-line error handler), in `qlora --help`'s order.
COMMANDS = (
    ("validate", validate.validate, True),
    ("train", train.train, True),
    ("evaluate", evaluate.evaluate, True),
    ("merge", merge.merge, True),
    ("demo-model", misc.demo_model, True),
    ("estimate", estimate.estimate_command, True),
    ("report", report.report, True),
    ("init", init.init, True),
    ("schema", misc.schema, False),
    ("exit-codes", misc.exit_codes, False),
    ("generate", generate.generate, True),
)
for name, command, wrapped in COMMANDS:
    app.command(name)(handle_errors(command) if wrapped else command)


def run() -> None:
    app()
