"""Our additions to the HF Trainer, as a mixin any Trainer subclass takes (TRL's included):
token meter, NaN guard, CPU 4-bit repack, loss kernel, staged checkpoints, layer-wise learning
rates, resume with the recipe's learning rate, and our own adapters' files.

Private Trainer hooks the mixin overrides, checked against transformers 5.24.0 (pyproject allows 5.x;
tests/unit/test_trainer_hooks.py fails on any release where one disappears or changes its arguments):

| hook                            | why                                                                |
|---------------------------------|--------------------------------------------------------------------|
| `_run_epoch`                    | no step past max_steps when resuming from the final checkpoint     |
| `_get_output_dir`               | checkpoints are written into a staging folder                      |
| `_save_checkpoint`              | staged, then published by rename; skipped after a NaN              |
| `_load_optimizer_and_scheduler` | the recipe's learning rate and weight decay over the checkpoint's  |
| `_save`                         | our own adapters' files instead of the model's state dict          |
| `_load_from_checkpoint`         | our own adapters' weights back from a checkpoint                   |
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from transformers import Trainer

from qlora_cli import plots
from qlora_cli.data.collate import real_tokens
from qlora_cli.model import kernels, quantized
from qlora_cli.model.adapters import Adapter
from qlora_cli.train import checkpointing, distributed, layer_lr
from qlora_cli.train.callbacks import NonFiniteLossGuard, TokenMeter


def trainable_finite(model) -> bool:
    """Whether every trainable (adapter) weight is finite; one device sync."""
    flags = [torch.isfinite(p).all() for p in model.parameters() if p.requires_grad]
    return bool(torch.stack(flags).all()) if flags else True


# The private hooks the mixin overrides, in the table above.
PRIVATE_HOOKS = ("_run_epoch", "_get_output_dir", "_save_checkpoint", "_load_optimizer_and_scheduler", "_save", "_load_from_checkpoint")


class QloraTrainerMixin:
    """Put before a Trainer class: at every micro-batch, count non-padding tokens (over all ranks),
    restore 4-bit weights that a CPU evaluation repacked (see quantized.unpack_cpu_4bit_weights),
    stop on a NaN/inf loss, and compute the loss with the selected kernel (kernels.py); and
    checkpoints written whole or not at all (see checkpointing.staged_checkpoint)."""

    def __init__(self, *args, token_meter: TokenMeter, loss_guard: NonFiniteLossGuard, loss_kernel: kernels.LossKernel,
                 adapter: Optional[Adapter] = None, layer_lr_decay: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter = adapter
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
            quantized.unpack_cpu_4bit_weights(model)
        # Tokens of all ranks: throughput and tokens_seen count the whole job, not one process.
        self.token_meter.add(distributed.all_reduce_sum(self.count_tokens(inputs), self.args.device), self.state)
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

    def count_tokens(self, inputs) -> int:
        """Non-padding tokens of a micro-batch (an objective that generates its batch counts them itself)."""
        return real_tokens(inputs)

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
        if self.adapter is None or not self.adapter.ours:
            return super()._save(output_dir, state_dict)
        if not self.args.should_save:  # rank 0 alone writes the adapter files
            return None
        output_dir = output_dir or self.args.output_dir
        self.adapter.save(Path(output_dir))  # the adapter only, not the frozen base
        self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.adapter is None or not self.adapter.ours:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self.adapter.load_checkpoint(Path(resume_from_checkpoint))


class QloraTrainer(QloraTrainerMixin, Trainer):
    """The HF Trainer with our additions (supervised fine-tuning)."""


def trainer_class(base: type = Trainer) -> type:
    """Our additions on any Trainer subclass (e.g. one of TRL's), as one class."""
    return QloraTrainer if base is Trainer else type(f"Qlora{base.__name__}", (QloraTrainerMixin, base), {})
