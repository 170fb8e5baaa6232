"""`qlora evaluate`: loss, perplexity and exact / normalised match, base vs adapter (vs merged)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from qlora_cli.cli.console import JsonOption, SetOption, err, out
from qlora_cli.rundir import writer_lock


def evaluate(
    target: Path = typer.Argument(..., help="A run directory (adapter + recipe.yaml), or a recipe YAML whose output.dir holds the adapter."),
    data: Optional[Path] = typer.Option(None, "--data", help="Eval data file to use instead of the recipe's held-out data (same format)."),
    compare: str = typer.Option("base,adapter", "--compare", help="Models side by side, comma-separated: base, adapter, merged."),
    merged: Optional[Path] = typer.Option(None, "--merged", help="A merged folder (the --output of `qlora merge`); adds `merged` to --compare."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1, help="Use only the first N eval rows."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", min=1, help="Greedy decoding budget; default: the longest reference + 9 tokens."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Rows per forward pass."),
    output: Optional[Path] = typer.Option(None, "--output", help="Where to write eval.json (default: in the run directory)."),
    set_: Optional[List[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Loss, perplexity and greedy exact / normalised match on the eval data: base vs adapter (vs merged)."""
    # The wings load torch / transformers: imported when the command runs, so `qlora --help` stays fast.
    from qlora_cli.evaluate.scores import parse_compare, resolve_target, run_evaluation, write_report

    kinds = parse_compare(compare, merged)
    recipe, adapter_dir = resolve_target(target, set_, data)
    if output is None:
        output = (adapter_dir if adapter_dir.is_dir() else Path(".")) / "eval.json"
    if recipe.train.objective != "sft":
        return _evaluate_objective(recipe, adapter_dir, kinds, max_samples, max_new_tokens, batch_size, output, as_json)
    # eval.json goes into a run directory: not while another process writes there (a run still training).
    with writer_lock(output.parent, "this evaluation"):
        report = run_evaluation(recipe, adapter_dir, kinds, merged, max_samples, max_new_tokens, batch_size, show_progress=not as_json)
        write_report(report, output)
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title="qlora evaluate", title_justify="left")
    for column in ("model", "loss", "perplexity", "exact match", "normalised match"):
        table.add_column(column, justify="left" if column == "model" else "right")
    percent = lambda value: "n/a" if value is None else f"{100 * value:.1f}%"  # noqa: E731
    for name, scores in report["models"].items():
        table.add_row(name, f"{scores['loss']:.4f}", f"{scores['perplexity']:.3f}", percent(scores["exact_match"]), percent(scores["normalized_match"]))
    out.print(table)
    if report["examples"]:
        examples = Table(title="examples", title_justify="left")
        examples.add_column("reference")
        for name in report["models"]:
            examples.add_column(name)
        for example in report["examples"][:3]:
            examples.add_row(example["reference"], *(example[name] for name in report["models"]))
        out.print(examples)
    if not report["held_out"]:
        err.print("[yellow]warning:[/] the recipe has no eval data (data.eval / data.eval_split): these are training rows")
    scored = next(iter(report["models"].values()))["scored_tokens"]
    out.print(f"{report['rows']} rows, {scored:,} scored tokens, {report['quantization']} base, {report['compute_dtype']} compute, "
              f"{report['wall_time_s']} s; wrote {output}")


def _evaluate_objective(recipe, adapter_dir: Path, kinds: list[str], max_samples, max_new_tokens, batch_size: int, output: Path, as_json: bool) -> None:
    """Preference runs: reward accuracy and margin on held-out pairs; GRPO runs: mean reward per function."""
    # The wings load torch / transformers: imported when the command runs, so `qlora --help` stays fast.
    from qlora_cli.errors import ConfigError
    from qlora_cli.evaluate.preference import run_preference_evaluation
    from qlora_cli.evaluate.rewards import run_reward_evaluation
    from qlora_cli.evaluate.scores import write_report

    if "merged" in kinds:
        raise ConfigError(f"--compare merged: a {recipe.train.objective} run is evaluated as base vs adapter; drop merged (a merged folder scores as its adapter does)")
    with writer_lock(output.parent, "this evaluation"):
        if recipe.train.objective == "grpo":
            report = run_reward_evaluation(recipe, adapter_dir, kinds, max_samples, max_new_tokens, batch_size, show_progress=not as_json)
        else:
            report = run_preference_evaluation(recipe, adapter_dir, kinds, max_samples, batch_size, show_progress=not as_json)
        write_report(report, output)
    if as_json:
        print(json.dumps(report))
        return
    table = Table(title=f"qlora evaluate ({recipe.train.objective})", title_justify="left")
    if recipe.train.objective == "grpo":
        names = list(report["weights"])
        columns = ["mean reward", *(f"{name} (x{report['weights'][name]:g})" for name in names), "exact match"]
        rows = {model: [scores["mean_reward"], *(scores["rewards"][name] for name in names), scores.get("exact_match")]
                for model, scores in report["models"].items()}
    else:
        columns = ["reward accuracy", "mean margin (nats)", "chosen logp", "rejected logp"]
        rows = {model: [scores["reward_accuracy"], scores["mean_margin"], scores["chosen_logp"], scores["rejected_logp"]]
                for model, scores in report["models"].items()}
    for column in ("model", *columns):
        table.add_column(column, justify="left" if column == "model" else "right")
    for model, values in rows.items():
        table.add_row(model, *("n/a" if value is None else f"{value:.3f}" for value in values))
    out.print(table)
    if recipe.train.objective == "grpo" and report["examples"]:
        examples = Table(title="examples", title_justify="left")
        for column in report["examples"][0]:
            examples.add_column(column)
        for example in report["examples"][:3]:
            examples.add_row(*example.values())
        out.print(examples)
    if not report["held_out"]:
        err.print("[yellow]warning:[/] the recipe has no eval data (data.eval / data.eval_split): these are training rows")
    out.print(f"{report['rows']} rows, {report['quantization']} base, {report['compute_dtype']} compute, {report['wall_time_s']} s; wrote {output}")
