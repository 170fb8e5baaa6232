"""Running `qlora train` as several processes: who this process is, the TrainingArguments a
strategy needs, and `--nproc` (re-launching through torchrun on one machine).

The engines are the standard ones: torchrun (or `accelerate launch`) starts the processes and
sets RANK / LOCAL_RANK / WORLD_SIZE; the HF Trainer (through accelerate) wraps the model in
DDP or FSDP, or hands it to DeepSpeed. This module only chooses their settings.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from qlora_cli.errors import ConfigError, ResourceError
from qlora_cli.recipe.schema import Recipe


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """This process's place, from the variables torchrun / accelerate launch set."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    return World(rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", rank)), size=size)


def strategy(recipe: Recipe, here: World) -> str:
    """"none" for one process, else the recipe's strategy (auto = ddp)."""
    if not here.distributed:
        return "none"
    chosen = recipe.distributed.strategy
    return "ddp" if chosen == "auto" else chosen


def _decoder_layer_class(model) -> str:
    """Class name of the repeated transformer block, FSDP's wrap unit."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(getattr(inner, "model", None), "layers", None)
    if layers is not None and len(layers):
        return type(layers[0]).__name__
    names = sorted(getattr(inner, "_no_split_modules", None) or [])
    if len(names) == 1:
        return names[0]
    raise ConfigError("distributed.strategy fsdp: cannot find this model's decoder layer class to wrap; use strategy ddp")


def training_kwargs(recipe: Recipe, here: World, on_gpu: bool, model=None) -> dict:
    """TrainingArguments settings for the strategy (empty for a single process)."""
    chosen = strategy(recipe, here)
    if chosen == "none":
        return {}
    backend = recipe.distributed.backend
    if backend == "auto":
        backend = "nccl" if on_gpu else "gloo"
    if backend == "nccl" and not on_gpu:
        raise ConfigError("distributed.backend nccl needs CUDA GPUs; use gloo (or auto) on CPUs")
    kwargs = {
        "ddp_backend": backend,
        # LoRA trains every adapter parameter in every step: no unused-parameter search.
        "ddp_find_unused_parameters": False,
        # Plain data parallel: the weights of a rank never change without the others.
        "ddp_broadcast_buffers": False,
    }
    if not on_gpu:
        kwargs["use_cpu"] = True  # accelerate's MULTI_CPU (gloo) instead of a silent single process
    if chosen == "fsdp":
        if model is None:
            raise ValueError("fsdp settings need the model")
        kwargs["fsdp"] = "full_shard auto_wrap" + (" offload" if recipe.distributed.fsdp_cpu_offload else "")
        kwargs["fsdp_config"] = {
            "transformer_layer_cls_to_wrap": [_decoder_layer_class(model)],
            "use_orig_params": False,
            "sync_module_states": True,
            "state_dict_type": "FULL_STATE_DICT",
            "backward_prefetch": "backward_pre",
        }
    elif chosen == "deepspeed":
        path = Path(recipe.distributed.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"distributed.deepspeed_config {path} does not exist; give the path of a DeepSpeed JSON config")
        try:
            json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"distributed.deepspeed_config {path} is not valid JSON (line {exc.lineno}); fix it") from None
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError("distributed.strategy deepspeed needs the deepspeed package: pip install deepspeed")
        kwargs["deepspeed"] = str(path)
    return kwargs


def checkpoint_world_size(checkpoint: Path) -> int:
    """How many processes wrote a checkpoint (one RNG state file per rank)."""
    ranked = list(checkpoint.glob("rng_state_*.pth"))
    return len(ranked) if ranked else 1


def check_resume_world(checkpoint: Path, here: World) -> None:
    written_by = checkpoint_world_size(checkpoint)
    if written_by != here.size:
        raise ConfigError(
            f"{checkpoint.name} was written by {written_by} process(es) but this run has {here.size}; "
            f"resume with the same count (qlora train ... --resume --nproc {written_by})"
        )


def launch_command(nproc: int, argv: list[str]) -> list[str]:
    """torchrun on this machine, running `qlora` with the same arguments minus --nproc."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "qlora_cli", *argv]


def check_nproc(nproc: int) -> None:
    import torch

    if world().distributed:
        raise ConfigError("--nproc re-launches through torchrun; this process was already launched by one: drop --nproc")
    if torch.cuda.is_available() and nproc > torch.cuda.device_count():
        raise ResourceError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} GPU(s); use at most that many")


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run the command under torchrun with `nproc` processes; returns their exit status.

    Ctrl-C / SIGTERM go to torchrun, which passes them on to every rank (each saves its part
    of a checkpoint and stops).
    """
    env = dict(os.environ)
    # torchrun would pin every process to one thread; on CPUs share the cores out instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    child = subprocess.Popen(launch_command(nproc, argv), env=env)

    def forward(signum, _frame):
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def all_reduce_sum(value: int, device) -> int:
    """Sum an integer over all processes (identity without a process group)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    total = torch.tensor([value], dtype=torch.long, device=device)
    dist.all_reduce(total)
    return int(total.item())


def any_rank(flag: bool, device) -> bool:
    """True on every process when it is true on any (identity without a process group)."""
    return all_reduce_sum(int(flag), device) > 0
