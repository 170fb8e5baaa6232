"""`qlora train`: preflight, TrainingArguments, the HF Trainer run, resume, and the saved run
directory (PEFT adapter, tokenizer, resolved recipe.yaml, metrics.json, checkpoints).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from qlora_cli import adapters, bottleneck, layer_lr, modeling
from qlora_cli.atomic import write_text_atomic
from qlora_cli.callbacks import NonFiniteLossGuard, ProgressDisplay, StopOnSignal, TokenMeter, write_metrics
from qlora_cli.collate import build_collator, real_tokens
from qlora_cli.config import Recipe, recipe_to_yaml
from qlora_cli.data import check_sources, load_splits
from qlora_cli.errors import ConfigError, ResourceError

CHECKPOINT_PREFIX = "checkpoint-"
_OPTIMIZERS = {
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "adamw_8bit": "adamw_bnb_8bit",
    "adamw_torch": "adamw_torch",
}


def checkpoints(output_dir: Path) -> list[Path]:
    """Intact checkpoints, oldest first (a torn one lacks its trainer state)."""
    found = []
    for path in output_dir.glob(CHECKPOINT_PREFIX + "*"):
        step = path.name[len(CHECKPOINT_PREFIX):]
        if path.is_dir() and step.isdigit() and (path / "trainer_state.json").is_file():
            found.append((int(step), path))
    return [path for _, path in sorted(found)]


def preflight(recipe: Recipe, resume: bool, force: bool) -> Optional[Path]:
    """Cheap checks before loading anything; returns the checkpoint to resume from."""
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
        found = checkpoints(output_dir) if output_dir.is_dir() else []
        if not found:
            raise ConfigError(f"--resume: no checkpoint in {output_dir} to resume from; run without --resume")
        return found[-1]
    if occupied and not force:
        raise ResourceError(
            f"output.dir {output_dir} is not empty; use --resume to continue it, --force to overwrite it, or --set output.dir=NEW"
        )
    parent = output_dir.parent if not output_dir.exists() else output_dir
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise ResourceError(f"output.dir {output_dir}: {parent} is not writable; choose another output.dir")
    return None


def precision_flags(dtype: torch.dtype) -> dict:
    if dtype == torch.bfloat16:
        return {"bf16": True}
    if dtype == torch.float16:
        return {"fp16": torch.cuda.is_available()}
    return {}


def build_training_args(recipe: Recipe, dtype: torch.dtype, has_eval: bool) -> TrainingArguments:
    train = recipe.train
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
        ddp_find_unused_parameters=False,
        **precision_flags(dtype),
    )


class QloraTrainer(Trainer):
    """The HF Trainer plus two things done at every micro-batch: count non-padding tokens,
    and restore 4-bit weights that a CPU evaluation repacked (see modeling.unpack_cpu_4bit_weights)."""

    def __init__(self, *args, token_meter: TokenMeter, layer_lr_decay: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.token_meter = token_meter
        self.layer_lr_decay = layer_lr_decay
        self.quantized_on_cpu = getattr(self.model, "is_loaded_in_4bit", False) and not torch.cuda.is_available()

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.quantized_on_cpu:
            modeling.unpack_cpu_4bit_weights(model)
        self.token_meter.add(real_tokens(inputs), self.state)
        return super().training_step(model, inputs, num_items_in_batch)

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

    def _save(self, output_dir=None, state_dict=None):
        if getattr(self.model, "_qlora_bottleneck", None) is None:
            return super()._save(output_dir, state_dict)
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


def save_adapter(model, tokenizer, output_dir: Path) -> None:
    """Write the adapter and tokenizer beside each other, each file replaced atomically."""
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=output_dir))
    try:
        adapters.save(model, staging)
        tokenizer.save_pretrained(staging)
        for item in staging.iterdir():
            os.replace(item, output_dir / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
    resume_from = preflight(recipe, resume, force)
    tokenizer = modeling.load_tokenizer(recipe.model)
    train_set, eval_set, train_stats, eval_stats = load_splits(recipe.data, tokenizer, recipe.train.seed)

    from transformers import set_seed

    set_seed(recipe.train.seed)
    dtype = modeling.compute_dtype(recipe)
    model = modeling.load_base_model(recipe)
    model = modeling.prepare_for_training(model, recipe.train.gradient_checkpointing)
    model = adapters.attach(model, recipe)
    trainable, total = modeling.count_parameters(model)

    output_dir = Path(recipe.output.dir)
    if force and output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output_dir / "recipe.yaml", recipe_to_yaml(recipe))

    info = {
        "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "compute_dtype": str(dtype).removeprefix("torch."),
        "quantization": modeling.quantization_label(recipe.quantization),
        "attention": model.config._attn_implementation,
        "method": recipe.adapter.method + (f" (init {recipe.lora.init})" if recipe.adapter.method == "lora" and recipe.lora.init != "default" else ""),
        "packing": recipe.data.packing if not adapters.is_prompt_method(recipe.adapter.method) else
        f"off ({recipe.adapter.method} adds its virtual tokens once per sequence, so rows are padded, not packed)",
        "trainable_params": trainable,
        "total_params": total,
        "train_rows": train_stats.kept,
        "eval_rows": eval_stats.kept if eval_stats else 0,
        "train_tokens": train_stats.tokens,
        "resumed_from": str(resume_from) if resume_from else None,
        "data": train_stats.summary(),
    }
    if on_ready:
        on_ready(info)

    meter, stop, guard = TokenMeter(), StopOnSignal(), NonFiniteLossGuard()
    trainer = QloraTrainer(
        model=model,
        args=build_training_args(recipe, dtype, eval_set is not None),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=build_collator(recipe.data.packing, tokenizer.pad_token_id, torch.cuda.is_available()),
        processing_class=tokenizer,
        callbacks=[*callbacks, meter, ProgressDisplay(meter, enabled=show_progress), stop, guard],
        token_meter=meter,
        layer_lr_decay=recipe.adapter.layer_lr_decay,
    )
    for default_display in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(default_display)

    stop.install()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        interrupted = stop.requested
        if eval_set is not None and not interrupted and guard.bad_step is None:
            trainer.evaluate()
    finally:
        stop.uninstall()

    extra = {key: info[key] for key in ("device", "compute_dtype", "quantization", "trainable_params", "total_params", "train_rows", "eval_rows")}
    extra["wall_time_s"] = round(time.perf_counter() - started, 1)
    metrics = write_metrics(output_dir / "metrics.json", trainer.state, meter, extra)
    guard.raise_if_tripped()
    if not interrupted:
        save_adapter(trainer.model, tokenizer, output_dir)
        adapters.finish(trainer.model)
    return TrainResult(output_dir=output_dir, metrics=metrics, interrupted=interrupted, info=info)
