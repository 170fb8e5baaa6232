"""The command line: the Typer app (app.py) and one thin module per command, printing with rich."""

from qlora_cli.cli.app import app, run

__all__ = ["app", "run"]
