"""Several training sources in one run: each loaded with its own format, columns, split and subset,
checked with its file named, cut to `take` rows, and mixed by `weight`: the mix has as many rows
as its weighted sources together, and each weighted source gives round(rows x weight / total
weight) of them (sampled without repetition while the source has enough, repeated when it has not).
The counts are exact, so the proportions are the weights up to rounding; the order is shuffled.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

from qlora_cli.data.sources import check_rows, load_rows
from qlora_cli.recipe.schema import DataSection, SourceSection


@dataclass
class Part:
    """One source of data.train: its rows (raw, checked) and the DataSection they are read with."""

    name: str
    section: DataSection
    rows: object  # datasets.Dataset
    weight: Optional[float] = None
    take: Optional[int] = None


def _source(item) -> SourceSection:
    return SourceSection(path=item) if isinstance(item, str) else item


def load_parts(data: DataSection, key: str = "data.train") -> list[Part]:
    """Every source of data.train, loaded and checked (file and row named in errors), take applied."""
    parts = []
    for item in [data.train] if isinstance(data.train, str) else data.train:
        source = _source(item)
        section = data.model_copy(update={"format": source.format or data.format, "columns": source.columns or data.columns})
        rows = load_rows(source.path, source.split or data.split, key, source.subset)
        check_rows(rows, section, f"{key} {source.path}")
        if source.take:
            rows = rows.select(range(min(source.take, len(rows))))
        parts.append(Part(source.path, section, rows, source.weight, source.take))
    return parts


def is_weighted(parts: list[Part]) -> bool:
    return any(part.weight is not None for part in parts)


def draw(sizes: list[int], weights: list[Optional[float]], seed: int) -> list[list[int]]:
    """Row indices taken from each source: all rows of an unweighted source (a take, or a plain
    list), and for the weighted ones their share of the rows the weighted sources hold together."""
    weighted = [index for index, weight in enumerate(weights) if weight is not None]
    total_rows = sum(sizes[index] for index in weighted)
    total_weight = sum(weights[index] for index in weighted)
    generator = random.Random(seed)
    picks = []
    for index, size in enumerate(sizes):
        if weights[index] is None:
            picks.append(list(range(size)))
            continue
        wanted = round(total_rows * weights[index] / total_weight)
        repeats, rest = divmod(wanted, size) if size else (0, 0)
        picks.append(list(range(size)) * repeats + sorted(generator.sample(range(size), rest)))
    return picks


def report(parts: list[Part], picks: list[list[int]], sizes: list[int]) -> list[dict]:
    """What validate and train print about the mix: per source, its rows (tokenized, kept), the
    weight or take, the rows the mix uses and their share."""
    used_total = sum(len(pick) for pick in picks) or 1
    return [
        {
            "source": part.name,
            "format": part.section.format,
            "rows": size,
            "weight": part.weight,
            "take": part.take,
            "used": len(pick),
            "share": round(len(pick) / used_total, 4),
            "repeated": len(pick) > size,
        }
        for part, pick, size in zip(parts, picks, sizes)
    ]


def shuffled_order(count: int, seed: int) -> list[int]:
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return order
