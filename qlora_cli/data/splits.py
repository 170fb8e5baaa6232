"""Train and held-out rows as the recipe describes them (one rule for both, used by training,
evaluation and merge checks), tokenized with their statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from qlora_cli.data import preference
from qlora_cli.data.formats import IGNORE_INDEX, format_row
from qlora_cli.data.mix import Part, draw, is_weighted, load_parts, report, shuffled_order
from qlora_cli.data.sources import check_fields, check_rows, load_rows
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
    longest = 0
    for index, row in enumerate(dataset):
        try:
            ids, labels = format_row(row, data, tokenizer, index)
        except DataError as exc:
            message = str(exc)
            raise DataError(message if message.startswith("row ") and key in message else f"{key}: {message}") from None
        longest = max(longest, len(ids))
        if len(ids) > data.max_seq_len:
            if data.overlong == "drop":
                stats.dropped_long += 1
                continue
            if any(label != IGNORE_INDEX for label in labels[data.max_seq_len:]):
                stats.answers_cut += 1
            ids, labels = ids[: data.max_seq_len], labels[: data.max_seq_len]
            stats.truncated += 1
        scored = sum(1 for label in labels[1:] if label != IGNORE_INDEX)  # the first token is never predicted
        if scored == 0:
            stats.dropped_unscored += 1
            continue
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["length"].append(len(ids))
        stats.tokens += len(ids)
        stats.scored_tokens += scored
        stats.lengths.append(len(ids))
    stats.kept = len(out["input_ids"])
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
            f"(the model would never see the answers end); raise data.max_seq_len (the longest row has {longest} tokens) "
            "or set data.overlong: drop"
        )
    return datasets.Dataset.from_dict(out), stats


def checked_rows(spec, data: DataSection, key: str):
    """The rows of every source in `spec`, each checked with its file and row named, as one dataset."""
    import datasets

    parts = []
    for source in [spec] if isinstance(spec, str) else spec:
        part = load_rows(source, data.split, key)
        check_rows(part, data, f"{key} {source}")
        parts.append(part)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _merged(parts: list[Part]) -> list[Part]:
    """A plain list of paths read alike is one source (its rows concatenated), as it always was."""
    if len(parts) > 1 and not is_weighted(parts) and all(p.take is None and p.section == parts[0].section for p in parts):
        import datasets

        return [Part(", ".join(p.name for p in parts), parts[0].section, datasets.concatenate_datasets([p.rows for p in parts]))]
    return parts


def split_parts(data: DataSection, seed: int) -> tuple[list[Part], Optional[list[Part]]]:
    """The training sources and their held-out rows (None without data.eval_split): a seeded
    eval_split of each source's (max_rows-cut, for a single source) rows."""
    parts = _merged(load_parts(data, "data.train"))
    if data.max_rows and len(parts) == 1:
        parts[0].rows = parts[0].rows.select(range(min(data.max_rows, len(parts[0].rows))))
    if data.eval or data.eval_split == 0:
        return parts, None
    held_out = []
    for part in parts:
        if len(part.rows) < 2:
            raise DataError(f"data.eval_split needs at least 2 training rows ({part.name} has {len(part.rows)})")
        split = part.rows.train_test_split(test_size=data.eval_split, seed=seed)
        part.rows = split["train"]
        held_out.append(Part(part.name, part.section, split["test"]))
    return parts, held_out


def split_rows(data: DataSection, seed: int):
    """The raw (train, held-out or None) rows read with data.format and data.columns: data.eval, or
    the seeded eval_split of those sources. Evaluation and merge checks decode from them."""
    parts, held_out = split_parts(data, seed)
    alike = [index for index, part in enumerate(parts) if part.section == data]
    if not alike:
        raise DataError("no data.train source is in data.format with data.columns, so nothing to evaluate with them; set data.eval")
    import datasets

    train_rows = datasets.concatenate_datasets([parts[index].rows for index in alike])
    if data.eval:
        return train_rows, checked_rows(data.eval, data, "data.eval")
    if held_out is None:
        return train_rows, None
    return train_rows, datasets.concatenate_datasets([held_out[index].rows for index in alike])


def _mixed(tokenized: list, parts: list[Part], data: DataSection, seed: int):
    """The tokenized sources as one training set, mixed by weight, with the stats of the mix."""
    import datasets

    sizes = [len(rows) for rows, _ in tokenized]
    picks = draw(sizes, [part.weight for part in parts], seed)
    mixed = datasets.concatenate_datasets([rows.select(pick) for (rows, _), pick in zip(tokenized, picks)])
    if is_weighted(parts):
        mixed = mixed.select(shuffled_order(len(mixed), seed))
    if data.max_rows:
        mixed = mixed.select(range(min(data.max_rows, len(mixed))))
    stats = TokenStats(rows=sum(s.rows for _, s in tokenized), lengths=list(mixed["length"]))
    for _, part_stats in tokenized:
        stats.truncated += part_stats.truncated
        stats.dropped_long += part_stats.dropped_long
        stats.dropped_unscored += part_stats.dropped_unscored
        stats.answers_cut += part_stats.answers_cut
    stats.kept, stats.tokens = len(mixed), sum(stats.lengths)
    stats.scored_tokens = sum(sum(1 for label in labels[1:] if label != IGNORE_INDEX) for labels in mixed["labels"])
    stats.mix = report(parts, picks, sizes)
    return mixed, stats


def load_splits(data: DataSection, tokenizer, seed: int):
    """Tokenized (train, eval or None) datasets and their stats, as the recipe describes."""
    parts, held_out = split_parts(data, seed)
    tokenized = [tokenize_rows(part.rows, part.section, tokenizer, f"data.train {part.name}") for part in parts]
    train, train_stats = tokenized[0] if len(parts) == 1 else _mixed(tokenized, parts, data, seed)
    evaluation, eval_stats = (None, None)
    if data.eval:
        evaluation, eval_stats = tokenize_rows(checked_rows(data.eval, data, "data.eval"), data, tokenizer, "data.eval")
    elif held_out:
        pieces = [tokenize_rows(part.rows, part.section, tokenizer, f"data.eval (held out of {part.name})") for part in held_out]
        evaluation, eval_stats = pieces[0] if len(pieces) == 1 else _mixed(pieces, held_out, data.model_copy(update={"max_rows": None}), seed)
        if len(pieces) > 1:
            eval_stats.mix = None
    return train, evaluation, train_stats, eval_stats


def eval_rows_for_generation(data: DataSection, seed: int):
    """The raw held-out rows (not tokenized) that evaluation and merge checks decode from; the
    training rows stand in when the recipe has no eval data."""
    if data.eval:
        return load_rows(data.eval, data.split, "data.eval")
    train_rows, eval_rows = split_rows(data, seed)
    return train_rows if eval_rows is None else eval_rows
