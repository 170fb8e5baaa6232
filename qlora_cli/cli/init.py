"""`qlora init`: a commented starting recipe whose memory settings fit the card."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qlora_cli.cli.console import kv_table, out
from qlora_cli.errors import ConfigError
from qlora_cli.estimate import GIB
from qlora_cli.estimate.starter import TASK_FORMATS, init_recipe


def init(
    model: str = typer.Option(..., "--model", help="A model folder (read through its config.json), a catalog name or a hub id."),
    gpu: Optional[str] = typer.Option(None, "--gpu", help="The card to fit, e.g. RTX4090, A100-80GB, H100 (see qlora estimate --help)."),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="Or the card's memory: 24GiB, 24GB (10^9 bytes), 24576MiB."),
    task: str = typer.Option("chat", "--task", help="chat (messages), instruct (alpaca rows) or text (plain text)."),
    output: Path = typer.Option(Path("recipe.yaml"), "--output", "-o", help="Recipe file to write."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing --output file."),
) -> None:
    """Write a starting recipe whose quantization, checkpointing, micro-batch and sequence length fit the GPU."""

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
