"""Raw rows to token ids with labels, one rule for every path (in memory, streamed, a sample):
each row rendered by its format, cut or dropped at max_seq_len, counted into TokenStats; a set
with nothing to learn, or whose answers max_seq_len mostly cuts away, is a DataError.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from qlora_cli.data import preference
from qlora_cli.data.formats import IGNORE_INDEX, format_row
from qlora_cli.data.sources import check_fields
from qlora_cli.errors import DataError
from qlora_cli.recipe.schema import DataSection


@dataclass
class TokenStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_long: int = 0
    dropped_unscored: int = 0
    answers_cut: int = 0  # rows whose trained tokens max_seq_len cut (the end of the answer, or all of it)
    mix: Optional[list] = None  # per source of a mix: rows, weight, used, share (data/mix.report)
    tokens: int = 0
    scored_tokens: int = 0
    lengths: list[int] = field(default_factory=list)
    longest: int = 0  # tokens of the longest row before max_seq_len cut it
    sample: Optional[str] = None  # streaming: which rows these statistics describe

    def summary(self) -> dict:
        lengths = sorted(self.lengths) or [0]
        return {
            "rows": self.rows,
            "kept": self.kept,
            "truncated": self.truncated,
            "dropped_too_long": self.dropped_long,
            "dropped_no_scored_tokens": self.dropped_unscored,
            "answers_cut_by_max_seq_len": self.answers_cut,
            "tokens": self.tokens,
            "scored_tokens": self.scored_tokens,
            "min_len": lengths[0],
            "mean_len": round(sum(lengths) / len(lengths), 1),
            "max_len": lengths[-1],
            **({"sample": self.sample} if self.sample else {}),
            **({"mix": self.mix} if self.mix else {}),
        }


def tokenize_rows(dataset, data: DataSection, tokenizer, key: str = "data.train"):
    """Tokenize every row with its labels; returns (datasets.Dataset, TokenStats).

    Rows longer than max_seq_len are truncated or dropped (data.overlong); rows left with
    no scored token are dropped. A dataset with nothing left to score is a DataError.
    """
    import datasets

    check_fields(dataset, data, key)
    stats = TokenStats(rows=len(dataset))
    if data.format in preference.FORMATS:  # pairs / unpaired rows / prompts for the objectives beyond SFT
        return preference.tokenize_rows(dataset, data, tokenizer, key, stats), stats
    out = {"input_ids": [], "labels": [], "length": []}
    for index, row in enumerate(dataset):
        kept = tokenize_row(row, data, tokenizer, index, key, stats)
        if kept is not None:
            out["input_ids"].append(kept[0])
            out["labels"].append(kept[1])
            out["length"].append(len(kept[0]))
    stats.kept = len(out["input_ids"])
    check_learnable(stats, data, key)
    return datasets.Dataset.from_dict(out), stats


def check_learnable(stats: TokenStats, data: DataSection, key: str) -> None:
    """A DataError when the rows counted in `stats` leave nothing to learn, or when max_seq_len cuts
    away the end of the answer in most of them."""
    if stats.kept == 0:
        if stats.dropped_unscored:
            raise DataError(
                f"{key}: every row has all its labels masked (nothing to learn); check the chat template / columns, "
                "raise data.max_seq_len, or set data.train_on_prompt: true"
            )
        raise DataError(f"{key}: every row is longer than data.max_seq_len={data.max_seq_len}; raise it or use overlong: truncate")
    if stats.answers_cut * 2 > stats.rows:
        raise DataError(
            f"{key}: {stats.answers_cut} of {stats.rows} rows lose the end of their answer to data.max_seq_len={data.max_seq_len} "
            f"(the model would never see the answers end); raise data.max_seq_len (the longest row has {stats.longest} tokens) "
            "or set data.overlong: drop"
        )


def tokenize_row(row: dict, data: DataSection, tokenizer, index: int, key: str, stats: TokenStats) -> Optional[tuple[list[int], list[int]]]:
    """One raw row as (input_ids, labels), cut or dropped as data.overlong says, or None when it is
    dropped (too long, or nothing left to score); counted into `stats`. The in-memory and the
    streaming paths tokenize every row through here."""
    try:
        ids, labels = format_row(row, data, tokenizer, index)
    except DataError as exc:
        message = str(exc)
        raise DataError(message if message.startswith("row ") and key in message else f"{key}: {message}") from None
    stats.longest = max(stats.longest, len(ids))
    if len(ids) > data.max_seq_len:
        if data.overlong == "drop":
            stats.dropped_long += 1
            return None
        if any(label != IGNORE_INDEX for label in labels[data.max_seq_len:]):
            stats.answers_cut += 1
        ids, labels = ids[: data.max_seq_len], labels[: data.max_seq_len]
        stats.truncated += 1
    scored = sum(1 for label in labels[1:] if label != IGNORE_INDEX)  # the first token is never predicted
    if scored == 0:
        stats.dropped_unscored += 1
        return None
    stats.tokens += len(ids)
    stats.scored_tokens += scored
    stats.lengths.append(len(ids))
    return ids, labels
