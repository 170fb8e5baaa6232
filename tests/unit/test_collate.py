"""Batches: padding masks come from lengths, and padding-free packing leaves the loss of
every token unchanged."""

import torch

from qlora_cli.data.collate import PackingCollator, PaddingCollator, real_tokens
from qlora_cli.data.formats import IGNORE_INDEX
from tests.conftest import PAD_ID, TOKEN_ROWS, build_tiny_llama


def test_padding_masks_come_from_lengths_not_pad_ids():
    batch = PaddingCollator(pad_token_id=PAD_ID)(TOKEN_ROWS)
    # Row 0 ends in a real eos (= pad id): it must stay attended and scored.
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 2]
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 2, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert real_tokens(batch) == 10


def test_packing_resets_positions_and_masks_row_starts():
    batch = PackingCollator()(TOKEN_ROWS)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2, 9, 2, 10, 11, 12]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8, 2, IGNORE_INDEX, 2, IGNORE_INDEX, 11, 12]]
    assert "attention_mask" not in batch and real_tokens(batch) == 10


def _per_token_losses(model, batch):
    # use_cache=False as in training: transformers only honours packed position ids without a KV cache.
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits.float()
    labels = batch["labels"]
    shifted_logits, shifted_labels = logits[:, :-1], labels[:, 1:]
    losses = torch.nn.functional.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels, reduction="none", ignore_index=IGNORE_INDEX)
    return losses[shifted_labels != IGNORE_INDEX]


def test_packing_does_not_change_per_token_loss():
    model = build_tiny_llama(vocab_size=32, seed=1)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        padded = _per_token_losses(model, PaddingCollator(pad_token_id=PAD_ID)(TOKEN_ROWS))
        packed = _per_token_losses(model, PackingCollator()(TOKEN_ROWS))
        whole_loss_padded = model(**PaddingCollator(pad_token_id=PAD_ID)(TOKEN_ROWS), use_cache=False).loss
        whole_loss_packed = model(**PackingCollator()(TOKEN_ROWS), use_cache=False).loss
    assert padded.shape == packed.shape == (6,)  # a row's first label is never predicted
    torch.testing.assert_close(packed, padded, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(whole_loss_packed, whole_loss_padded, rtol=1e-5, atol=1e-5)


def test_packing_without_position_reset_would_differ():
    """Guards the test above: attention across rows does change the loss on this model."""
    model = build_tiny_llama(vocab_size=32, seed=1)
    batch = PackingCollator()(TOKEN_ROWS)
    continuous = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    with torch.no_grad():
        assert not torch.allclose(_per_token_losses(model, batch), _per_token_losses(model, continuous), atol=1e-4)
