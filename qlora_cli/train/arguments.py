"""The recipe as the Trainer's TrainingArguments: optimizer names, precision flags, evaluation,
saving and the distributed strategy's settings.
"""

from __future__ import annotations

import torch
from transformers import TrainingArguments

from qlora_cli.recipe.schema import Recipe
from qlora_cli.train import distributed

_OPTIMIZERS = {
    "paged_adamw_8bit": "paged_adamw_8bit",
    "paged_adamw_32bit": "paged_adamw_32bit",
    "adamw_8bit": "adamw_bnb_8bit",
    "adamw_torch": "adamw_torch",
}


def precision_flags(dtype: torch.dtype) -> dict:
    if dtype == torch.bfloat16:
        return {"bf16": True}
    if dtype == torch.float16:
        return {"fp16": torch.cuda.is_available()}
    return {}


def build_training_args(recipe: Recipe, dtype: torch.dtype, has_eval: bool, model=None) -> TrainingArguments:
    return TrainingArguments(**training_kwargs(recipe, dtype, has_eval, model))


def training_kwargs(recipe: Recipe, dtype: torch.dtype, has_eval: bool, model=None) -> dict:
    """The recipe as TrainingArguments keywords (an objective's trainer may take them into its own config class)."""
    train = recipe.train
    parallel = distributed.training_kwargs(recipe, distributed.world(), torch.cuda.is_available(), model)
    evaluate_periodically = has_eval and train.eval_steps is not None
    return dict(
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
        train_sampling_strategy="random" if recipe.data.packing or recipe.data.streaming else "group_by_length",  # a stream has no sampler
        length_column_name="length",
        disable_tqdm=True,
        dataloader_pin_memory=torch.cuda.is_available(),
        torch_compile=train.compile,
        **{"ddp_find_unused_parameters": False, **parallel},
        **precision_flags(dtype),
    )
