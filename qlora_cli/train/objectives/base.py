"""What every training objective is to `qlora train`: a name, how its Trainer is built from the
recipe, and the curves it logs beside the loss. The helpers here make TRL's trainers behave like
ours: our mixin on top, the reference = the base with the adapter disabled (no second copy), the
adapter kept in the dtype our SFT path trains it in, and no model card written into the run dir.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qlora_cli.train.trainer import trainer_class


@dataclass(frozen=True)
class Objective:
    name: str  # train.objective in the recipe
    description: str
    # (ready: train.run.Setup, args_kwargs: TrainingArguments keywords, trainer_kwargs: our mixin's and the
    # Trainer's common keywords) -> the trainer
    build: Callable
    curves: tuple[str, ...] = ()  # logged metrics plotted into objective.png
    # recipe -> None: cheap checks before any model loads (ConfigError / DataError, one line)
    check: Callable = lambda recipe: None


class _NoModelCard:
    """TRL writes a README.md model card into args.output_dir at every checkpoint: the run directory
    holds only what `qlora train` writes, so none."""

    def create_model_card(self, *args, **kwargs) -> None:
        return None


def trl_trainer_class(base: type, *extra: type) -> type:
    """Our mixin (train/trainer.py) on one of TRL's trainers, plus objective-specific overrides."""
    return type(f"Qlora{base.__name__}", (*extra, _NoModelCard, trainer_class(base)), {})


def trl_config_kwargs(args_kwargs: dict) -> dict:
    """Our TrainingArguments keywords for a TRL config: its defaults (bf16 on, gradient checkpointing on)
    must not override the recipe, which already prepared the model; rows are padded, not grouped by a length column."""
    return {
        **args_kwargs,
        "bf16": args_kwargs.get("bf16", False),
        "gradient_checkpointing": False,  # model/loading.prepare_for_training already set the recipe's choice
        "train_sampling_strategy": "random",
    }


def trainable_dtypes(model) -> dict:
    return {name: param.dtype for name, param in model.named_parameters() if param.requires_grad}


def restore_reference_and_dtypes(trainer, dtypes: dict, continued: bool) -> None:
    """After a TRL trainer's __init__: drop the "ref" copy it adds of a fresh adapter (the reference is then
    the base with the adapter disabled, as TRL does when no copy exists; a continued adapter, model.init_adapter,
    keeps its frozen copy: base + that adapter is the reference) and put back the adapter's dtypes
    (TRL casts a 4-bit base's adapter to bf16, which CPUs emulate ~10x slower than fp32)."""
    model = trainer.model
    if "ref" in getattr(model, "peft_config", {}) and not continued:
        model.delete_adapter("ref")
    for name, param in model.named_parameters():
        if name in dtypes and param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])


class PreTokenized:
    """data/preference.py tokenized the rows already, with our masks and checks: TRL's own pass is skipped."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
        return dataset


class PairRows:
    """TRL's older pair trainers (CPO for SimPO, ORPO) tokenize text rows themselves: here each row
    becomes the keys they expect from data/preference.py's ids, and their batches (chosen and rejected
    sequences, each with its own attention mask) are counted by the token meter."""

    def tokenize_row(self, feature, model=None) -> dict:
        prompt = feature["prompt_ids"]
        row = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for name in ("chosen", "rejected"):
            response = feature[f"{name}_ids"]
            row[f"{name}_input_ids"] = prompt + response
            row[f"{name}_attention_mask"] = [1] * (len(prompt) + len(response))
            row[f"{name}_labels"] = [-100] * len(prompt) + response
        return row

    def count_tokens(self, inputs) -> int:
        return int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum())
