"""One training step exactly as `qlora train` takes it, for the two commands that observe one:
`--measure` (CUDA allocator peaks) and `--trace` (live tensor bytes on any device). The model
and loss kernel come from train/run.build_model, the optimizer from the Trainer's own choice, the
loss from kernels.causal_lm_loss (what QloraTrainer.compute_loss computes), and the batch is the
worst case the collators can hand over: every row filled to max_seq_len.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import Trainer

from qlora_cli.data.formats import IGNORE_INDEX
from qlora_cli.model import kernels, loading
from qlora_cli.recipe.schema import Recipe
from qlora_cli.train.arguments import build_training_args
from qlora_cli.train.run import build_model


@dataclass
class StepParts:
    """What a training step runs with: the peft model, its loss kernel, the optimizer, the dtype."""

    model: torch.nn.Module
    loss_kernel: kernels.LossKernel
    optimizer: torch.optim.Optimizer
    dtype: torch.dtype
    vocab_size: int


def build_step_parts(recipe: Recipe) -> StepParts:
    """The model, loss kernel and optimizer `qlora train` builds for this recipe, not look-alikes."""
    adapter, loss_kernel = build_model(recipe)
    dtype = loading.compute_dtype(recipe)
    model = adapter.model
    model.train()
    # TrainingArguments refuses bf16 without a GPU; the optimizer it picks does not depend on precision.
    args = build_training_args(recipe, dtype if torch.cuda.is_available() else torch.float32, has_eval=False, model=model)
    optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    optimizer = optimizer_cls([p for p in model.parameters() if p.requires_grad], **optimizer_kwargs)
    return StepParts(model, loss_kernel, optimizer, dtype, model.config.get_text_config().vocab_size)


def random_batch(recipe: Recipe, vocab_size: int, generator: torch.Generator) -> dict:
    """One worst-case micro-batch: every row filled to max_seq_len, laid out as the collators do
    (packed: one row with position_ids restarting per sequence; padded: an attention mask). With
    several padded rows the last one ends a token early, so the mask is really there: transformers
    drops an all-ones mask, which a real batch of unequal rows never is."""
    rows, seq = recipe.train.micro_batch_size, recipe.data.max_seq_len
    ids = torch.randint(0, vocab_size, (rows, seq), generator=generator)
    if recipe.data.packing:
        flat = ids.reshape(1, -1)
        positions = torch.arange(seq).repeat(rows).reshape(1, -1)
        return {"input_ids": flat, "labels": flat.clone(), "position_ids": positions}
    mask, labels = torch.ones_like(ids), ids.clone()
    if rows > 1:
        mask[-1, -1], labels[-1, -1] = 0, IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def train_step(parts: StepParts, batch: dict, hooks=None) -> float:
    """Forward + loss, backward, optimizer step, zero_grad(set_to_none) as the Trainer does them,
    under autocast in the compute dtype (the Trainer's bf16/fp16 mixed precision). `hooks(phase)`
    is told when the backward and the optimizer step begin."""
    device = next(parts.model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=parts.dtype, enabled=parts.dtype != torch.float32):
        loss = kernels.causal_lm_loss(parts.model, batch, parts.loss_kernel)
    if hooks:
        hooks("backward")
    loss.backward()
    if hooks:
        hooks("optimizer")
    parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    value = float(loss.detach())
    del loss
    return value
