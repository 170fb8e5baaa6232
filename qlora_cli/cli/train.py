"""`qlora train`: fine-tune as the recipe says (one process, or N through torchrun with --nproc)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from qlora_cli.cli.console import SetOption, err, kv_table, out, state
from qlora_cli.errors import ConfigError, ResourceError
from qlora_cli.estimate.fit import auto_fit
from qlora_cli.recipe.loader import load_recipe


def train(
    recipe: Path = typer.Argument(..., help="Recipe YAML (or the run directory of a run to --resume)."),
    set_: Optional[List[str]] = SetOption,
    resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in output.dir."),
    force: bool = typer.Option(False, "--force", help="Overwrite a non-empty output.dir."),
    nproc: Optional[int] = typer.Option(None, "--nproc", min=1, help="Train with N processes on this machine (re-launches through torchrun; one per GPU)."),
    fit: bool = typer.Option(False, "--auto-fit", help="CUDA: pick micro-batch, accumulation (same effective batch) and checkpointing that fit the GPU's free memory."),
) -> None:
    """Fine-tune a LoRA/QLoRA adapter as the recipe says; saves a PEFT adapter, recipe.yaml and metrics.json."""
    # The wings load torch / transformers: imported when the command runs, so `qlora --help` stays fast.
    from qlora_cli.train.run import run_training

    config = load_recipe(recipe, set_)
    if fit and resume:
        raise ConfigError("--auto-fit picks a new batch layout and a resumed run keeps its checkpoint's; drop --auto-fit or --resume")
    if fit:
        set_ = [*(set_ or []), *fitted_overrides(config, nproc or 1)]
        config = load_recipe(recipe, set_)
    if nproc is not None and nproc > 1:
        # The wings load torch / transformers: imported when the command runs, so `qlora --help` stays fast.
        from qlora_cli.train import distributed
        from qlora_cli.train.preflight import preflight

        distributed.check_nproc(nproc)
        preflight(config, resume, force, distributed.World(rank=0, local_rank=0, size=nproc))  # fail here, not in N processes
        argv = [*(["--debug"] if state["debug"] else []), "train", str(recipe), *(f"--set={item}" for item in set_ or []), *(["--resume"] if resume else []), *(["--force"] if force else [])]
        raise typer.Exit(distributed.relaunch(nproc, argv))

    def on_ready(info: dict) -> None:
        for note in info.get("skipped_checkpoints", []):
            err.print(f"[yellow]warning:[/] skipping damaged {note}", soft_wrap=True)
        if info["resumed_from"]:
            err.print(f"resuming from {info['resumed_from']}", soft_wrap=True)
        shown = {k: v for k, v in info.items() if k not in ("data", "resumed_from", "skipped_checkpoints") and v is not None}
        shown["trainable_params"] = f"{info['trainable_params']:,} ({100 * info['trainable_params'] / info['total_params']:.2f}% of {info['total_params']:,})"
        del shown["total_params"]
        out.print(kv_table("qlora train", shown))

    result = run_training(config, resume=resume, force=force, on_ready=on_ready)
    if not result.is_main:
        raise typer.Exit(130 if result.interrupted else 0)
    metrics = result.metrics
    if result.interrupted:
        # The run directory, not the recipe: it holds the recipe as resolved with this run's --set
        # overrides (output.dir included), so the hint cannot continue another run of the same recipe.
        err.print(f"[yellow]stopped at step {metrics['global_step']}; checkpoint saved. Continue with:[/] "
                  f"{escape(shlex.join(['qlora', 'train', str(result.output_dir), '--resume', *resume_nproc(metrics)]))}", soft_wrap=True)
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


def fitted_overrides(config, processes: int) -> list[str]:
    """--auto-fit: the estimate's choice for the smallest free memory among the GPUs used, printed."""
    # torch only once the command runs, so `qlora --help` stays fast.
    import torch

    if not torch.cuda.is_available():
        raise ResourceError("--auto-fit sizes the run to a CUDA GPU's free memory and none is visible here; drop --auto-fit")
    free = min(torch.cuda.mem_get_info(index)[0] for index in range(min(processes, torch.cuda.device_count())))
    choice = auto_fit(config, free, processes)
    err.print(f"auto-fit: {choice.describe()}", soft_wrap=True)
    return choice.overrides()


def resume_nproc(metrics: dict) -> list[str]:
    """`--nproc N` for a run of N processes: a checkpoint resumes with the process count that wrote it."""
    processes = metrics.get("processes") or 1
    return ["--nproc", str(processes)] if processes > 1 else []
