"""data.streaming: training rows read while the Trainer consumes them, for data bigger than memory.

Each source is a datasets.IterableDataset whose rows are checked and tokenized one at a time by
the in-memory path's own functions (errors name the file and the row); a plain list of sources is
read one after the other, a weighted one interleaved by weight (datasets.interleave_datasets,
seeded; a source that runs out starts again until every one has been read once). What validate and
the start-up table report comes from a sample: the first SAMPLE_ROWS rows of each source, checked
with the same rules before any weight loads, and the first SAMPLE_ROWS rows of the mix.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import islice
from typing import Iterator, Optional

from qlora_cli.data.sources import check_row, stream_rows
from qlora_cli.data.tokenized import TokenStats, check_learnable, tokenize_row
from qlora_cli.recipe.schema import DataSection, SourceSection

SAMPLE_ROWS = 1000


@dataclass(frozen=True)
class Source:
    """One source of data.train as the stream reads it."""

    index: int
    name: str
    section: DataSection  # data.format and data.columns, or this source's own
    split: str
    subset: Optional[str] = None
    weight: Optional[float] = None
    take: Optional[int] = None


def sources(data: DataSection) -> list[Source]:
    items = [data.train] if isinstance(data.train, str) else data.train
    found = []
    for index, item in enumerate(items):
        source = SourceSection(path=item) if isinstance(item, str) else item
        section = data.model_copy(update={"format": source.format or data.format, "columns": source.columns or data.columns})
        found.append(Source(index, source.path, section, source.split or data.split, source.subset, source.weight, source.take))
    return found


def raw_rows(source: Source, key: str = "data.train") -> Iterator[tuple[int, dict]]:
    """(row number, row) of one source, each row checked as its format needs, `take` applied."""
    rows = stream_rows(source.name, source.split, key, source.subset)
    for index, row in enumerate(islice(rows, source.take) if source.take else rows):
        check_row(row, source.section, f"{key} {source.name}: row {index + 1}")
        yield index, row


def _tokenized(source: Source, tokenizer, key: str) -> Iterator[dict]:
    """The rows training sees from one source: tokenized, cut or dropped at max_seq_len."""
    where = f"{key} {source.name}"
    for index, row in raw_rows(source, key):
        kept = tokenize_row(row, source.section, tokenizer, index, where, TokenStats())
        if kept is not None:
            ids, labels = kept
            yield {"input_ids": ids, "labels": labels, "length": len(ids), "source": source.index}


def train_stream(data: DataSection, tokenizer, seed: int):
    """The training rows as one datasets.IterableDataset (input_ids, labels, length, source)."""
    import datasets

    features = datasets.Features({
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),
        "source": datasets.Value("int32"),
    })
    found = sources(data)
    streams = [
        datasets.IterableDataset.from_generator(_tokenized, features=features, gen_kwargs={"source": source, "tokenizer": tokenizer, "key": "data.train"})
        for source in found
    ]
    if len(streams) == 1:
        stream = streams[0]
    elif any(source.weight is not None for source in found):
        total = sum(source.weight for source in found)
        stream = datasets.interleave_datasets(
            streams, probabilities=[source.weight / total for source in found], seed=seed, stopping_strategy="all_exhausted"
        )
    else:
        stream = datasets.concatenate_datasets(streams)
    return stream.take(data.max_rows) if data.max_rows else stream


def sample(data: DataSection, tokenizer, seed: int, stream=None):
    """(the first SAMPLE_ROWS training rows of the stream as a datasets.Dataset, their TokenStats).

    The first SAMPLE_ROWS rows of every source are checked and tokenized first with the in-memory
    rules (a source with nothing to learn, or whose answers max_seq_len mostly cuts, is a DataError),
    so a broken file is named before any model loads; the statistics count those rows, and the mix
    (several sources) reports the share of each source among the first rows the stream yields."""
    import datasets

    found = sources(data)
    stats = TokenStats()
    for source in found:
        where = f"data.train {source.name}"
        own = TokenStats()
        for index, row in islice(raw_rows(source), SAMPLE_ROWS):
            own.rows += 1
            own.kept += tokenize_row(row, source.section, tokenizer, index, where, own) is not None
        check_learnable(own, source.section, where)
        _add(stats, own)
    first = list(islice(stream if stream is not None else train_stream(data, tokenizer, seed), SAMPLE_ROWS))
    each = "" if len(found) == 1 else " of each source"
    stats.sample = f"first {SAMPLE_ROWS:,} rows{each}"
    if len(found) > 1:
        stats.mix = _mix_report(found, Counter(row["source"] for row in first), len(first))
    rows = datasets.Dataset.from_dict({key: [row[key] for row in first] for key in ("input_ids", "labels", "length")})
    return rows, stats


def _add(total: TokenStats, part: TokenStats) -> None:
    for name in ("rows", "kept", "truncated", "dropped_long", "dropped_unscored", "answers_cut", "tokens", "scored_tokens"):
        setattr(total, name, getattr(total, name) + getattr(part, name))
    total.lengths.extend(part.lengths)
    total.longest = max(total.longest, part.longest)


def _mix_report(found: list[Source], counts: Counter, sampled: int) -> list[dict]:
    """The mix as validate prints it (data/mix.report's keys): a stream's size is unknown, so `rows`
    is None and `used` / `share` count the first rows the stream yielded."""
    return [
        {
            "source": source.name,
            "format": source.section.format,
            "rows": None,
            "weight": source.weight,
            "take": source.take,
            "used": counts[source.index],
            "share": round(counts[source.index] / (sampled or 1), 4),
            "repeated": False,
        }
        for source in found
    ]


def first_rows(data: DataSection, limit: int = SAMPLE_ROWS):
    """The first `limit` raw rows of the sources read with data.format and data.columns, as a
    datasets.Dataset: what evaluation and the merge checks decode from when training streamed."""
    import datasets

    alike = [source for source in sources(data) if source.section == data]
    rows = []
    for source in alike:
        rows.extend(row for _, row in islice(raw_rows(source), limit - len(rows)))
    return datasets.Dataset.from_list(rows) if rows else None
