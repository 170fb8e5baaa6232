"""`qlora train` in three phases: setup (data, model, adapter, loss kernel), fit (the Trainer run)
and publish (metrics, loss.png, the final adapter).
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from qlora_cli import plots, rundir
from qlora_cli.atomic import write_text_atomic
from qlora_cli.data.splits import load_splits
from qlora_cli.model import adapters, families, kernels, loading
from qlora_cli.model.adapters import Adapter, vllm_rules
from qlora_cli.recipe.loader import recipe_to_yaml
from qlora_cli.recipe.schema import Recipe
from qlora_cli.train import checkpointing, distributed, objectives, storage, trackers
from qlora_cli.train.arguments import training_kwargs
from qlora_cli.train.callbacks import NonFiniteLossGuard, ProgressDisplay, StopOnSignal, TokenMeter, write_metrics
from qlora_cli.train.preflight import preflight


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict
    interrupted: bool = False
    info: dict = field(default_factory=dict)
    is_main: bool = True  # False on ranks > 0 of a multi-process run: they report nothing


@dataclass
class Setup:
    """Everything a run trains with, built before the Trainer exists."""

    recipe: Recipe
    tokenizer: object
    train_set: object
    eval_set: Optional[object]
    adapter: Adapter
    loss_kernel: kernels.LossKernel
    dtype: torch.dtype
    info: dict


def build_model(recipe: Recipe) -> tuple[Adapter, kernels.LossKernel]:
    """The model `qlora train` trains (base, preparation, adapter) and the loss kernel it uses;
    `qlora estimate --measure` measures exactly this."""
    model = loading.load_base_model(recipe)
    model = loading.prepare_for_training(model, recipe.train.gradient_checkpointing)
    adapter = adapters.attach(model, recipe)
    return adapter, kernels.select_loss_kernel(recipe.train.loss_kernel, adapter.model)


def setup(recipe: Recipe, resume_from: Optional[Path], skipped: list[str], force: bool, here: distributed.World) -> Setup:
    """Data, model, adapter and loss kernel; the run directory made ready (rank 0)."""
    trackers.prepare(recipe.train.report_to, Path(recipe.output.dir))
    tokenizer = loading.load_tokenizer(recipe.model)
    train_set, eval_set, train_stats, eval_stats = load_splits(recipe.data, tokenizer, recipe.train.seed)
    set_seed(recipe.train.seed)
    dtype = loading.compute_dtype(recipe)
    adapter, loss_kernel = build_model(recipe)
    model = adapter.model
    trainable, total = loading.count_parameters(model)

    output_dir = Path(recipe.output.dir)
    if here.is_main:
        storage.check_free_space(recipe, storage.trainable_tensors(model), reclaimable=force, tokenizer_bytes=storage.saved_size(tokenizer))
        if force and output_dir.exists():
            for item in rundir.entries(output_dir):  # all but the lock this run holds
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
        output_dir.mkdir(parents=True, exist_ok=True)
        rundir.remove_leftovers(output_dir)
        with checkpointing.disk_errors("recipe.yaml", output_dir):
            write_text_atomic(output_dir / "recipe.yaml", recipe_to_yaml(recipe))

    method = recipe.adapter.method
    info = {
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "compute_dtype": str(dtype).removeprefix("torch."),
        "quantization": loading.quantization_label(recipe.quantization),
        "attention": model.config._attn_implementation,
        "method": method + (f" (init {recipe.lora.init})" if method == "lora" and recipe.lora.init != "default" else ""),
        "packing": recipe.data.packing if not adapter.method.virtual_tokens else
        f"off ({method} adds its virtual tokens once per sequence, so rows are padded, not packed)",
        "processes": f"{here.size} ({distributed.strategy(recipe, here)})" if here.distributed else 1,
        "loss_kernel": f"{loss_kernel.name} ({loss_kernel.reason})",
        "compile": "torch.compile" if recipe.train.compile else "off",
        **({"targets": adapter.note} if adapter.note else {}),
        **({"family": untested} if (untested := families.family(recipe.model).note) else {}),
        "vllm": vllm_rules.summary(adapter.saved_config(), adapter.method.why_not_mergeable is None),
        "trainable_params": trainable,
        "total_params": total,
        "train_rows": f"streamed (statistics of the {train_stats.sample})" if train_stats.sample else train_stats.kept,
        "eval_rows": eval_stats.kept if eval_stats else 0,
        "train_tokens": None if train_stats.sample else train_stats.tokens,
        "resumed_from": str(resume_from) if resume_from else None,
        "skipped_checkpoints": skipped,
        "data": train_stats.summary(),
    }
    return Setup(recipe, tokenizer, train_set, eval_set, adapter, loss_kernel, dtype, info)


def build_trainer(ready: Setup, show_progress: bool, callbacks: tuple, here: distributed.World):
    """The Trainer with our callbacks; returns (trainer, meter, stop, guard, display)."""
    recipe = ready.recipe
    meter, stop, guard = TokenMeter(), StopOnSignal(), NonFiniteLossGuard()
    display = ProgressDisplay(meter, enabled=show_progress and here.is_main)
    trainer_kwargs = dict(
        model=ready.adapter.model,
        train_dataset=ready.train_set,
        eval_dataset=ready.eval_set,
        processing_class=ready.tokenizer,
        callbacks=[*callbacks, meter, display, stop, guard],
        token_meter=meter,
        loss_guard=guard,
        loss_kernel=ready.loss_kernel,
        adapter=ready.adapter,
        layer_lr_decay=recipe.adapter.layer_lr_decay,
    )
    args_kwargs = training_kwargs(recipe, ready.dtype, ready.eval_set is not None, ready.adapter.model)
    trainer = objectives.objective(recipe.train.objective).build(ready, args_kwargs, trainer_kwargs)
    for default_display in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(default_display)
    trackers.point_into_run(trainer, Path(recipe.output.dir))
    return trainer, meter, stop, guard, display


def fit(trainer, ready: Setup, resume_from: Optional[Path], stop: StopOnSignal, guard: NonFiniteLossGuard, display: ProgressDisplay) -> bool:
    """Train (and evaluate at the end); returns whether a signal stopped the run."""
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        display.on_train_end(trainer.args, trainer.state, trainer.control)  # also after an error
    interrupted = stop.requested
    if ready.eval_set is not None and not interrupted and guard.bad_step is None and not evaluated_at_last_step(trainer.state):
        trainer.evaluate()
    return interrupted


def evaluated_at_last_step(state) -> bool:
    """Whether the Trainer already evaluated after the last step: with train.eval_steps set it always
    does (at a multiple of eval_steps, or at the end when the last step is not one), and a second
    pass over the same weights would only double the time the final evaluation takes."""
    return any("eval_loss" in entry and entry.get("step") == state.global_step for entry in state.log_history)


def publish(trainer, ready: Setup, meter: TokenMeter, guard: NonFiniteLossGuard, interrupted: bool, started: float,
            here: distributed.World) -> dict:
    """metrics.json and loss.png (also for a stopped run), then the final adapter unless stopped or non-finite."""
    output_dir = Path(ready.recipe.output.dir)
    extra = {key: ready.info[key] for key in ("device", "compute_dtype", "quantization", "trainable_params", "total_params", "train_rows", "eval_rows")}
    extra["wall_time_s"] = round(time.perf_counter() - started, 1)
    extra["processes"] = here.size
    metrics = {}
    if here.is_main:
        with checkpointing.disk_errors("metrics.json", output_dir):
            metrics = write_metrics(output_dir / "metrics.json", trainer.state, meter, extra)
        plots.write_loss_plot(output_dir, metrics)
        plots.write_objective_plot(output_dir, metrics, objectives.objective(ready.recipe.train.objective).curves)
    if guard.bad_step is None:
        trainer.adapter_went_nonfinite()
    guard.raise_if_tripped(output_dir)
    if not interrupted:
        # Under FSDP / DeepSpeed every rank takes part in gathering the full adapter; only rank 0 writes it.
        sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
        state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
        if here.is_main:
            checkpointing.publish_adapter(ready.adapter, ready.tokenizer, output_dir, state_dict)
            ready.adapter.finish()
    return metrics


def run_training(
    recipe: Recipe,
    resume: bool = False,
    force: bool = False,
    on_ready: Optional[Callable[[dict], None]] = None,
    show_progress: bool = True,
    callbacks: tuple = (),
) -> TrainResult:
    """Train the adapter the recipe describes and save the run directory: setup, fit, publish."""
    started = time.perf_counter()
    here = distributed.world()
    resume_from, skipped = preflight(recipe, resume, force, here)
    # One writer per run directory: rank 0 holds the lock for the whole job (the other ranks write
    # only into the staging folders rank 0 publishes).
    with rundir.writer_lock(recipe.output.dir, "this run") if here.is_main else contextlib.nullcontext():
        ready = setup(recipe, resume_from, skipped, force, here)
        if on_ready and here.is_main:
            on_ready(ready.info)
        trainer, meter, stop, guard, display = build_trainer(ready, show_progress, callbacks, here)
        # The signal handler stays until the final files are written: a SIGTERM after the last step
        # lets them finish instead of killing the process halfway through them.
        stop.install()
        try:
            interrupted = fit(trainer, ready, resume_from, stop, guard, display)
            metrics = publish(trainer, ready, meter, guard, interrupted, started, here)
        finally:
            stop.uninstall()
    return TrainResult(output_dir=Path(recipe.output.dir), metrics=metrics, interrupted=interrupted, info=ready.info, is_main=here.is_main)
