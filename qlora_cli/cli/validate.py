"""`qlora validate`: the recipe and its data checked without loading the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from qlora_cli.cli.console import JsonOption, SetOption, kv_table, out
from qlora_cli.recipe.adapter_section import describe as describe_adapter
from qlora_cli.recipe.loader import load_recipe
from qlora_cli.recipe.objective_section import describe as describe_objective


def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML (or a run directory holding recipe.yaml)."),
    set_: Optional[List[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Check a recipe and its data (fields, label masks, token lengths) without loading the model."""
    # The wings load torch / transformers: imported when the command runs, so `qlora --help` stays fast.
    from qlora_cli.data.splits import load_splits
    from qlora_cli.evaluate.rewards import check_recipe_rewards
    from qlora_cli.model.loading import load_tokenizer

    config = load_recipe(recipe, set_)
    check_recipe_rewards(config)  # GRPO: each reward imported and called once on the first rows
    tokenizer = load_tokenizer(config.model)
    _, _, train_stats, eval_stats = load_splits(config.data, tokenizer, config.train.seed)
    summary = {
        "recipe": str(recipe),
        "model": config.model.path,
        "quantization": f"{config.quantization.bits}-bit",
        "adapter": describe_adapter(config),
        "objective": describe_objective(config),
        "format": config.data.format,
        "train": train_stats.summary(),
        "eval": eval_stats.summary() if eval_stats else None,
    }
    if as_json:
        print(json.dumps(summary))
        return
    out.print(kv_table("recipe", {k: v for k, v in summary.items() if k not in ("train", "eval")}))
    for name in ("train", "eval"):
        if summary[name]:
            out.print(kv_table(f"{name} data", summary[name]))
    out.print("[green]recipe and data are valid[/]")
