"""`qlora validate`: the recipe and its data checked without loading the model."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table
from rich.text import Text

from qlora_cli.cli.console import JsonOption, SetOption, kv_table, out
from qlora_cli.data.formats import IGNORE_INDEX
from qlora_cli.recipe.adapter_section import describe as describe_adapter
from qlora_cli.recipe.loader import load_recipe
from qlora_cli.recipe.objective_section import describe as describe_objective


def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML (or a run directory holding recipe.yaml)."),
    set_: Optional[List[str]] = SetOption,
    as_json: bool = JsonOption,
    show: int = typer.Option(0, "--show", min=0, help="Print N rendered training rows: trained tokens highlighted, the rest dimmed (--json: spans)."),
) -> None:
    """Check a recipe and its data (fields, label masks, token lengths) without loading the model."""
    # The wings load torch / transformers: imported when the command runs, so `qlora --help` stays fast.
    from qlora_cli.data.splits import load_splits
    from qlora_cli.evaluate.rewards import check_recipe_rewards
    from qlora_cli.model.families import family
    from qlora_cli.model.loading import load_tokenizer

    config = load_recipe(recipe, set_)
    check_recipe_rewards(config)  # GRPO: each reward imported and called once on the first rows
    tokenizer = load_tokenizer(config.model)
    train_set, _, train_stats, eval_stats = load_splits(config.data, tokenizer, config.train.seed)
    summary = {
        "recipe": str(recipe),
        "model": config.model.path,
        "quantization": f"{config.quantization.bits}-bit",
        "adapter": describe_adapter(config),
        "objective": describe_objective(config),
        "format": config.data.format,
        "train": train_stats.summary(),
        "eval": eval_stats.summary() if eval_stats else None,
        "notes": [note] if (note := family(config.model).note) else [],
    }
    shown = [row_spans(row, tokenizer) for row in islice(train_set, show)]  # a Dataset, or the stream (data.streaming)
    if shown:
        summary["rows"] = shown
    if as_json:
        print(json.dumps(summary))
        return
    out.print(kv_table("recipe", {k: v for k, v in summary.items() if k not in ("train", "eval", "rows", "notes")}))
    for name in ("train", "eval"):
        if summary[name]:
            title = f"{name} data" + (" (a sample of the stream)" if summary[name].get("sample") else "")
            out.print(kv_table(title, {k: v for k, v in summary[name].items() if k != "mix"}))
    if summary["train"].get("mix"):
        out.print(mix_table(summary["train"]["mix"]))
    for number, row in enumerate(shown, start=1):
        out.rule(f"row {number}: {row['trained']} of {row['tokens']} tokens trained", align="left")
        text, plain = Text(), out.color_system is None  # no colours (a pipe, NO_COLOR): trained text between ⟦ ⟧
        for span in row["spans"]:
            trained = span["trained"]
            text.append(f"⟦{span['text']}⟧" if trained and plain else span["text"], style="bold green" if trained else "dim")
        out.print(text, soft_wrap=True)
    if shown:
        out.rule()
    for note in summary["notes"]:
        out.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    out.print("[green]recipe and data are valid[/]")


def mix_table(mix: list[dict]) -> Table:
    """The training mix: per source its rows, weight or take, the rows used and their share."""
    streamed = any(source["rows"] is None for source in mix)  # used / share: the first rows the stream yields
    title = f"train mix (the first {sum(source['used'] for source in mix):,} rows of the stream)" if streamed else "train mix"
    table = Table(title=title, title_justify="left")
    for column in ("source", "format", "rows", "weight / take", "used", "share"):
        table.add_column(column, justify="left" if column in ("source", "format") else "right")
    for source in mix:
        chosen = f"take {source['take']}" if source["take"] else ("all" if source["weight"] is None else f"{source['weight']:g}")
        used = f"{source['used']:,}" + (" (repeats)" if source["repeated"] else "")
        rows = "streamed" if source["rows"] is None else f"{source['rows']:,}"
        table.add_row(source["source"], source["format"], rows, chosen, used, f"{100 * source['share']:.1f}%")
    return table


def row_spans(row: dict, tokenizer) -> dict:
    """One tokenized row as runs of trained / untrained text (decoded), with its token counts.
    The first token is never predicted, so it is never trained."""
    ids, labels = row["input_ids"], row["labels"]
    trained = [index > 0 and label != IGNORE_INDEX for index, label in enumerate(labels)]
    spans, start = [], 0
    for index in range(1, len(ids) + 1):
        if index == len(ids) or trained[index] != trained[start]:
            spans.append({"text": tokenizer.decode(ids[start:index]), "trained": trained[start]})
            start = index
    return {"tokens": len(ids), "trained": sum(trained), "spans": spans}
