"""Supervised fine-tuning: the HF Trainer with our mixin on tokenized rows (data/formats.py)."""

from __future__ import annotations

import torch
from transformers import TrainingArguments

from qlora_cli.data.collate import build_collator
from qlora_cli.train.objectives.base import Objective
from qlora_cli.train.trainer import QloraTrainer


def build(ready, args_kwargs: dict, trainer_kwargs: dict):
    collator = build_collator(ready.recipe.data.packing, ready.tokenizer.pad_token_id, torch.cuda.is_available())
    return QloraTrainer(args=TrainingArguments(**args_kwargs), data_collator=collator, **trainer_kwargs)


OBJECTIVE = Objective("sft", "supervised fine-tuning on the scored tokens of each row", build)
