"""`qlora report`: runs side by side, and their curves in one picture."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import typer

from qlora_cli.cli.console import JsonOption, out
from qlora_cli.report import draw_report, load_runs, summary_table, to_json


def report(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories (the output.dir of `qlora train`), one or several."),
    output: Path = typer.Option(Path("report.png"), "--output", "-o", help="Where to draw the runs' curves (PNG)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Draw the curves picture."),
    as_json: bool = JsonOption,
) -> None:
    """Summarise runs side by side: recipe differences, losses, eval scores, tokens/s, memory, time; draw their curves."""
    runs = load_runs(run_dirs)
    drawn = draw_report(runs, output) if plot else None
    if as_json:
        print(json.dumps(to_json(runs, drawn)))
        return
    out.print(summary_table(runs))
    if drawn:
        out.print(f"wrote {drawn}")
