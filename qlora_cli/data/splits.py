"""Train and held-out rows as the recipe describes them (one rule for both, used by training,
evaluation and merge checks), tokenized with their statistics.
"""

from __future__ import annotations

from typing import Optional

from qlora_cli.data import streaming
from qlora_cli.data.formats import IGNORE_INDEX
from qlora_cli.data.mix import Part, draw, is_weighted, load_parts, report, shuffled_order
from qlora_cli.data.sources import check_rows, load_rows
from qlora_cli.data.tokenized import TokenStats, tokenize_rows
from qlora_cli.errors import DataError
from qlora_cli.recipe.schema import DataSection


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
    the seeded eval_split of those sources. Evaluation and merge checks decode from them. Streamed
    (data.streaming), the train rows are the first rows of the stream, not all of them."""
    if data.streaming:
        train_rows = streaming.first_rows(data)
        if train_rows is None:
            raise DataError("no data.train source is in data.format with data.columns, so nothing to evaluate with them; set data.eval")
        return train_rows, checked_rows(data.eval, data, "data.eval") if data.eval else None
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
    """Tokenized (train, eval or None) datasets and their stats, as the recipe describes. Streamed
    (data.streaming), train is a datasets.IterableDataset and its stats describe a sample."""
    if data.streaming:
        stream = streaming.train_stream(data, tokenizer, seed)
        _, train_stats = streaming.sample(data, tokenizer, seed, stream)
        evaluation, eval_stats = (None, None)
        if data.eval:
            evaluation, eval_stats = tokenize_rows(checked_rows(data.eval, data, "data.eval"), data, tokenizer, "data.eval")
        return stream, evaluation, train_stats, eval_stats
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
