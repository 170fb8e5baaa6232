"""`qlora train`: preflight, TrainingArguments, the HF Trainer run, resume, and the saved run
directory (PEFT adapter, tokenizer, resolved recipe.yaml, metrics.json, checkpoints).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from qlora_cli import adapters, bottleneck, checkpointing, distributed, kernels, layer_lr, modeling, plots, storage, trackers
from qlora_cli.atomic import write_text_atomic
from qlora_cli.callbacks import NonFiniteLossGuard, ProgressDisplay, StopOnSignal, TokenMeter, write_metrics
from qlora_cli.collate import build_collator, real_tokens
from qlora_cli.config import Recipe, recipe_to_yaml
from qlora_cli.data import check_sources, load_splits
from qlora_cli.errors import ConfigError, ResourceError

_OPTIMIZERS = {
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "adamw_8bit": "adamw_bnb_8bit",
    "adamw_torch": "adamw_torch",
}


def preflight(
    recipe: Recipe, resume: bool, force: bool, here: Optional[distributed.World] = None
) -> tuple[Optional[Path], list[str]]:
    """Cheap checks before loading anything; returns the checkpoint to resume from and the
    damaged newer checkpoints it skips (one note each).

    In a multi-process run only rank 0 writes, so only rank 0 checks the output directory
    (the others would find what rank 0 has begun writing there).
    """
    here = here or distributed.world()
    if resume and force:
        raise ConfigError("--resume and --force contradict each other; pick one")
    modeling.check_model_path(recipe.model.path)
    adapters.preflight(recipe)
    check_sources(recipe.data.train, "data.train")
    if recipe.data.eval:
        check_sources(recipe.data.eval, "data.eval")
    if recipe.train.eval_steps and not (recipe.data.eval or recipe.data.eval_split):
        raise ConfigError("train.eval_steps needs eval data: set data.eval or data.eval_split")
    output_dir = Path(recipe.output.dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ResourceError(f"output.dir {output_dir} is a file; choose a directory path")
    occupied = output_dir.is_dir() and any(output_dir.iterdir())
    if resume:
        storage.probe_writable(output_dir)
        found, skipped = checkpointing.newest_intact(output_dir) if output_dir.is_dir() else (None, [])
        if found is None and skipped:
            raise ConfigError(f"--resume: no intact checkpoint in {output_dir} (damaged: {', '.join(skipped)}); use --force to start over")
        if found is None:
            raise ConfigError(f"--resume: no checkpoint in {output_dir} to resume from; run without --resume")
        distributed.check_resume_world(found, here)
        checkpointing.check_resumed_recipe(output_dir, recipe)
        return found, skipped
    if not here.is_main:
        return None, []
    if occupied and not force:
        raise ResourceError(
            f"output.dir {output_dir} is not empty; use --resume to continue it, --force to overwrite it, or --set output.dir=NEW"
        )
    if occupied and force:
        check_replaceable(output_dir)
    storage.probe_writable(output_dir)
    return None, []


def check_replaceable(output_dir: Path) -> None:
    """--force deletes output.dir: only a run directory, never one holding the user's own files or the working directory."""
    if Path.cwd().resolve().is_relative_to(output_dir.resolve()):
        raise ResourceError(f"output.dir {output_dir} holds the current directory, which --force would delete; choose another output.dir")
    foreign = checkpointing.foreign_entries(output_dir)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise ResourceError(
            f"--force replaces a run directory, but output.dir {output_dir} also holds {', '.join(foreign[:3])}{more}, which "
            "qlora train did not write; move them out or choose another output.dir (--set output.dir=NEW)"
        )


def precision_flags(dtype: torch.dtype) -> dict:
    if dtype == torch.bfloat16:
        return {"bf16": True}
    if dtype == torch.float16:
        return {"fp16": torch.cuda.is_available()}
    return {}


def build_training_args(recipe: Recipe, dtype: torch.dtype, has_eval: bool, model=None) -> TrainingArguments:
    train = recipe.train
    parallel = distributed.training_kwargs(recipe, distributed.world(), torch.cuda.is_available(), model)
    evaluate_periodically = has_eval and train.eval_steps is not None
    return TrainingArguments(
        output_dir=recipe.output.dir,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        learning_rate=train.learning_rate,
        lr_scheduler_type=train.lr_scheduler,
        warmup_steps=train.warmup_steps if train.warmup_steps is not None else train.warmup_ratio,
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        optim=_OPTIMIZERS[train.optimizer],
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        seed=train.seed,
        data_seed=train.seed,
        logging_steps=train.logging_steps,
        logging_first_step=True,
        logging_nan_inf_filter=False,  # a NaN must reach NonFiniteLossGuard, not be averaged away
        eval_strategy="steps" if evaluate_periodically else "no",
        eval_steps=train.eval_steps if evaluate_periodically else None,
        save_strategy="steps",
        save_steps=train.save_steps,
        save_total_limit=recipe.output.save_total_limit,
        report_to=[] if train.report_to == ["none"] else list(train.report_to),
        remove_unused_columns=False,
        train_sampling_strategy="random" if recipe.data.packing else "group_by_length",
        length_column_name="length",
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        torch_compile=train.compile,
        **{"ddp_find_unused_parameters": False, **parallel},
        **precision_flags(dtype),
    )


def trainable_finite(model) -> bool:
    """Whether every trainable (adapter) weight is finite; one device sync."""
    flags = [torch.isfinite(p).all() for p in model.parameters() if p.requires_grad]
    return bool(torch.stack(flags).all()) if flags else True


class QloraTrainer(Trainer):
    """The HF Trainer plus, at every micro-batch: count non-padding tokens (over all ranks),
    restore 4-bit weights that a CPU evaluation repacked (see modeling.unpack_cpu_4bit_weights),
    stop on a NaN/inf loss, and compute the loss with the selected kernel (kernels.py); and
    checkpoints written whole or not at all (see checkpointing.staged_checkpoint)."""

    def __init__(self, *args, token_meter: TokenMeter, loss_guard: NonFiniteLossGuard, loss_kernel: kernels.LossKernel,
                 layer_lr_decay: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_meter = token_meter
        self.loss_guard = loss_guard
        self.loss_kernel = loss_kernel
        self.layer_lr_decay = layer_lr_decay
        self.quantized_on_cpu = getattr(self.model, "is_loaded_in_4bit", False) and not torch.cuda.is_available()
        self._staging_root: Optional[Path] = None
        self._nonfinite_in_step = False

    def training_step(self, model, inputs, num_items_in_batch=None):
        several = self.args.world_size > 1
        if self.loss_guard.bad_step is not None and not several:  # the step is lost: skip its other micro-batches
            return torch.zeros((), device=self.args.device)
        if self.quantized_on_cpu:
            modeling.unpack_cpu_4bit_weights(model)
        # Tokens of all ranks: throughput and tokens_seen count the whole job, not one process.
        self.token_meter.add(distributed.all_reduce_sum(real_tokens(inputs), self.args.device), self.state)
        loss = super().training_step(model, inputs, num_items_in_batch)
        # One sync per micro-batch, as the Trainer's own logging_nan_inf_filter (off here) would do.
        self._nonfinite_in_step = self._nonfinite_in_step or not bool(torch.isfinite(loss))
        if several:
            if not self.accelerator.sync_gradients:
                return loss
            # Ranks must agree at the step's last micro-batch, or one stops (and skips a save) while the others wait for it.
            self._nonfinite_in_step = distributed.any_rank(self._nonfinite_in_step, self.args.device)
        if self._nonfinite_in_step:
            self.loss_guard.trip(self.state.global_step + 1, "loss", self.control)
        return loss

    def log(self, logs, start_time=None):
        logs.setdefault(plots.TOKENS_KEY, self.state.num_input_tokens_seen)  # loss against tokens, in metrics.json and trackers
        super().log(logs, start_time)

    def _run_epoch(self, *args, **kwargs):
        # Resuming from the final checkpoint (its adapter or metrics were never written) must not
        # train a step past max_steps, which the Trainer does when max_steps ends mid-epoch.
        if self.state.global_step >= self.state.max_steps > 0:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial) -> str:
        return str(self._staging_root) if self._staging_root is not None else super()._get_output_dir(trial)

    def adapter_went_nonfinite(self, model=None) -> bool:
        """Trip the guard when any rank's adapter weights hold NaN/inf. Every rank must decide alike
        (under FSDP each sees only its shard), or a save's barrier waits forever."""
        if distributed.any_rank(not trainable_finite(model or self.model), self.args.device):
            self.loss_guard.trip(self.state.global_step, "the adapter weights", self.control)
            return True
        return False

    def _save_checkpoint(self, model, trial) -> None:
        if self.loss_guard.bad_step is not None or self.adapter_went_nonfinite(model):
            return
        run_dir = Path(super()._get_output_dir(trial))
        with checkpointing.staged_checkpoint(
            run_dir, self.state.global_step, self.args.save_total_limit, self.args.should_save, self.accelerator.wait_for_everyone
        ) as staging:
            self._staging_root = staging
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging_root = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs or not self.loss_kernel.fused or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss = kernels.fused_causal_lm_loss(model, inputs, self.loss_kernel, num_items_in_batch)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            # As Trainer.compute_loss: DDP averages gradients over ranks, the token count is global.
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return loss

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with one parameter group per layer depth when layer-wise LR scaling is on."""
        if self.layer_lr_decay == 1.0 or self.optimizer is not None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = layer_lr.param_groups(
            opt_model, self.args.learning_rate, self.layer_lr_decay, self.args.weight_decay,
            set(self.get_decay_parameter_names(opt_model)), layer_lr.num_decoder_layers(opt_model),
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def _load_optimizer_and_scheduler(self, checkpoint):
        """Resume with the checkpoint's optimizer moments and step, but the recipe's learning rate and
        weight decay (loading the state would put back the old ones). The schedule's shape follows
        the recipe already: LambdaLR saves no lambdas, so warm-up, type and length are the new ones."""
        scheduler = getattr(self.lr_scheduler, "scheduler", self.lr_scheduler)  # accelerate may wrap it
        if checkpoint is None or self.is_deepspeed_enabled or not hasattr(scheduler, "lr_lambdas"):
            return super()._load_optimizer_and_scheduler(checkpoint)
        base_lrs = list(scheduler.base_lrs)
        decays = [group.get("weight_decay") for group in self.optimizer.param_groups]
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler.base_lrs = base_lrs
        lrs = [base * schedule(scheduler.last_epoch) for base, schedule in zip(base_lrs, scheduler.lr_lambdas)]
        for group, base, lr, decay in zip(self.optimizer.param_groups, base_lrs, lrs, decays):
            group.update(initial_lr=base, lr=lr, weight_decay=decay)
        scheduler._last_lr = lrs

    def _save(self, output_dir=None, state_dict=None):
        if getattr(self.model, "_qlora_bottleneck", None) is None:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:  # rank 0 alone writes the adapter files
            return None
        output_dir = output_dir or self.args.output_dir
        adapters.save(self.model, Path(output_dir))  # the adapter only, not the frozen base
        self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        model = self.model if model is None else model
        if getattr(model, "_qlora_bottleneck", None) is None:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        bottleneck.load_weights(model, Path(resume_from_checkpoint))


@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict
    interrupted: bool = False
    info: dict = field(default_factory=dict)
    is_main: bool = True  # False on ranks > 0 of a multi-process run: they report nothing


def run_training(
    recipe: Recipe,
    resume: bool = False,
    force: bool = False,
    on_ready: Optional[Callable[[dict], None]] = None,
    show_progress: bool = True,
    callbacks: tuple = (),
) -> TrainResult:
    """Train the adapter the recipe describes and save the run directory."""
    started = time.perf_counter()
    here = distributed.world()
    resume_from, skipped = preflight(recipe, resume, force, here)
    trackers.prepare(recipe.train.report_to, Path(recipe.output.dir))
    tokenizer = modeling.load_tokenizer(recipe.model)
    train_set, eval_set, train_stats, eval_stats = load_splits(recipe.data, tokenizer, recipe.train.seed)

    from transformers import set_seed

    set_seed(recipe.train.seed)
    dtype = modeling.compute_dtype(recipe)
    model = modeling.load_base_model(recipe)
    model = modeling.prepare_for_training(model, recipe.train.gradient_checkpointing)
    model = adapters.attach(model, recipe)
    trainable, total = modeling.count_parameters(model)
    loss_kernel = kernels.select_loss_kernel(recipe.train.loss_kernel, model)

    output_dir = Path(recipe.output.dir)
    if here.is_main:
        storage.check_free_space(recipe, trainable, reclaimable=force)
        if force and output_dir.exists():
            shutil.rmtree(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        checkpointing.remove_leftovers(output_dir)
        with checkpointing.disk_errors("recipe.yaml", output_dir):
            write_text_atomic(output_dir / "recipe.yaml", recipe_to_yaml(recipe))

    info = {
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "compute_dtype": str(dtype).removeprefix("torch."),
        "quantization": modeling.quantization_label(recipe.quantization),
        "attention": model.config._attn_implementation,
        "method": recipe.adapter.method + (f" (init {recipe.lora.init})" if recipe.adapter.method == "lora" and recipe.lora.init != "default" else ""),
        "packing": recipe.data.packing if not adapters.is_prompt_method(recipe.adapter.method) else
        f"off ({recipe.adapter.method} adds its virtual tokens once per sequence, so rows are padded, not packed)",
        "processes": f"{here.size} ({distributed.strategy(recipe, here)})" if here.distributed else 1,
        "loss_kernel": f"{loss_kernel.name} ({loss_kernel.reason})",
        "compile": "torch.compile" if recipe.train.compile else "off",
        "trainable_params": trainable,
        "total_params": total,
        "train_rows": train_stats.kept,
        "eval_rows": eval_stats.kept if eval_stats else 0,
        "train_tokens": train_stats.tokens,
        "resumed_from": str(resume_from) if resume_from else None,
        "skipped_checkpoints": skipped,
        "data": train_stats.summary(),
    }
    if on_ready and here.is_main:
        on_ready(info)

    meter, stop, guard = TokenMeter(), StopOnSignal(), NonFiniteLossGuard()
    display = ProgressDisplay(meter, enabled=show_progress and here.is_main)
    trainer = QloraTrainer(
        model=model,
        args=build_training_args(recipe, dtype, eval_set is not None, model),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=build_collator(recipe.data.packing, tokenizer.pad_token_id, torch.cuda.is_available()),
        processing_class=tokenizer,
        callbacks=[*callbacks, meter, display, stop, guard],
        token_meter=meter,
        loss_guard=guard,
        loss_kernel=loss_kernel,
        layer_lr_decay=recipe.adapter.layer_lr_decay,
    )
    for default_display in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(default_display)
    trackers.point_into_run(trainer, output_dir)

    # The signal handler stays until the final files are written: a SIGTERM after the last step
    # lets them finish instead of killing the process halfway through them.
    stop.install()
    try:
        try:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            display.on_train_end(trainer.args, trainer.state, trainer.control)  # also after an error
        interrupted = stop.requested
        if eval_set is not None and not interrupted and guard.bad_step is None:
            trainer.evaluate()
        extra = {key: info[key] for key in ("device", "compute_dtype", "quantization", "trainable_params", "total_params", "train_rows", "eval_rows")}
        extra["wall_time_s"] = round(time.perf_counter() - started, 1)
        extra["processes"] = here.size
        metrics = {}
        if here.is_main:
            with checkpointing.disk_errors("metrics.json", output_dir):
                metrics = write_metrics(output_dir / "metrics.json", trainer.state, meter, extra)
            plots.write_loss_plot(output_dir, metrics)
        if guard.bad_step is None:
            trainer.adapter_went_nonfinite()
        guard.raise_if_tripped(output_dir)
        if not interrupted:
            # Under FSDP / DeepSpeed every rank takes part in gathering the full adapter; only rank 0 writes it.
            sharded = trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled
            state_dict = trainer.accelerator.get_state_dict(trainer.model) if sharded else None
            if here.is_main:
                checkpointing.publish_adapter(trainer.model, tokenizer, output_dir, state_dict)
                adapters.finish(trainer.model)
    finally:
        stop.uninstall()
    return TrainResult(output_dir=output_dir, metrics=metrics, interrupted=interrupted, info=info, is_main=here.is_main)
