"""`qlora generate`: one base, several adapters, each prompt answered by the adapter it names."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from qlora_cli.cli.console import JsonOption, SetOption, err, out
from qlora_cli.errors import QloraError


def generate(
    prompts: Optional[List[str]] = typer.Argument(None, help="Prompts as 'NAME: text' (NAME = an --adapter name, or base); none: read --file, else stdin / an interactive prompt."),
    base: str = typer.Option(..., "--base", help="A recipe or run directory (how to load the base), or a model folder / hub id."),
    adapter: List[str] = typer.Option(..., "--adapter", help="NAME=DIR: an adapter (a `qlora train` run directory) to load under NAME (repeatable)."),
    file: Optional[Path] = typer.Option(None, "--file", help="Prompts, one 'NAME: text' (or JSON {adapter, prompt}) per line."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="Greedy decoding budget per answer."),
    set_: Optional[List[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Load the base once with several adapters and answer each prompt with the adapter it names."""
    # The wings load torch / transformers: imported when the command runs, so `qlora --help` stays fast.
    from qlora_cli.evaluate.generate import Generator, interactive_lines, parse_adapter_specs, parse_prompt, read_prompt_file, resolve_base

    specs = parse_adapter_specs(adapter)
    names = [name for name, _ in specs]
    batch = [parse_prompt(text, names) for text in prompts or []] + (read_prompt_file(file, names) if file else [])
    generator = Generator(resolve_base(base, specs, set_), specs)

    def show(items, answers) -> None:
        for item, answer in zip(items, answers):
            if as_json:
                print(json.dumps({"adapter": item.adapter, "prompt": item.text, "answer": answer}), flush=True)
            else:
                out.print(f"[bold cyan]{item.adapter}[/] {item.text}\n  [green]{answer}[/]", soft_wrap=True)

    if batch:
        show(batch, generator.answer(batch, max_new_tokens))
        return
    if not sys.stdin.isatty():
        lines = [line for line in sys.stdin.read().splitlines() if line.strip()]
        items = [parse_prompt(line, names) for line in lines]
        show(items, generator.answer(items, max_new_tokens))
        return
    err.print(f"adapters: {', '.join(names)} (and base). Type 'NAME: text'; an empty line ends.")
    for line in interactive_lines():
        try:
            item = parse_prompt(line, names)
        except QloraError as exc:
            err.print(f"[red]{exc}[/]")
            continue
        show([item], generator.answer([item], max_new_tokens))
