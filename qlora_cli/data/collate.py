"""Batch builders for tokenized rows (input_ids, labels, length).

- `PaddingCollator`: rows padded on the right to the longest in the batch; the attention
  mask and the padded labels come from the lengths.
- `PackingCollator`: padding-free; the rows of a micro-batch are laid end to end in one
  sequence with position ids restarting at 0 for each row. transformers turns restarting
  position ids into a block-diagonal causal mask (flash-attention varlen on GPU), so no
  token attends across rows and no compute is spent on padding. transformers honours
  this only when the forward runs without a KV cache (config.use_cache = False, as
  model/loading.prepare_for_training sets).
Both report `real_tokens(batch)`: the tokens that are not padding.
"""

from __future__ import annotations

import torch

from qlora_cli.data.formats import IGNORE_INDEX


class PaddingCollator:
    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = [len(f["input_ids"]) for f in features]
        width = max(lengths)
        if self.pad_to_multiple_of > 1:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            input_ids[row, :length] = torch.tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.tensor(feature["labels"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class PackingCollator:
    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, labels, position_ids = [], [], []
        for feature in features:
            length = len(feature["input_ids"])
            input_ids.extend(feature["input_ids"])
            # The first token of a row must not be predicted from the previous row's last one.
            labels.append(IGNORE_INDEX)
            labels.extend(feature["labels"][1:])
            position_ids.extend(range(length))
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
        }


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens in a batch from either collator."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int(batch["input_ids"].numel())


def build_collator(packing: bool, pad_token_id: int, on_gpu: bool):
    return PackingCollator() if packing else PaddingCollator(pad_token_id, pad_to_multiple_of=8 if on_gpu else 1)
