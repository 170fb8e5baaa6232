"""Where rows come from: files (.jsonl .json .csv .parquet), saved datasets folders and hub
datasets, loaded into one datasets.Dataset; the fields each format needs, checked per row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from qlora_cli.errors import DataError
from qlora_cli.recipe.paths import is_local_path
from qlora_cli.recipe.schema import DataSection

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _as_list(spec: Union[str, list[str]]) -> list[str]:
    return [spec] if isinstance(spec, str) else list(spec)


def check_sources(spec: Union[str, list[str]], key: str) -> None:
    """Fail fast on local data paths that do not exist (hub ids are checked when loaded)."""
    for source in _as_list(spec):
        if Path(source).expanduser().exists():
            continue
        if is_local_path(source, tuple(_FILE_BUILDERS)):
            raise DataError(f"{key}: {source} not found; give a .jsonl/.json/.csv/.parquet file, a saved dataset folder, or a hub id")
        if Path(source).suffix:
            raise DataError(f"{key}: {source} not found")


def load_rows(spec: Union[str, list[str]], split: str = "train", key: str = "data.train"):
    """Load one or more sources into a single datasets.Dataset."""
    import datasets

    check_sources(spec, key)
    parts = []
    for source in _as_list(spec):
        path = Path(source).expanduser()
        try:
            if path.is_file():
                builder = _FILE_BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise DataError(f"{key}: {source} has an unsupported extension; use .jsonl, .json, .csv or .parquet")
                part = datasets.load_dataset(builder, data_files=str(path), split="train")
            elif path.is_dir():
                part = datasets.load_from_disk(str(path))
                if isinstance(part, datasets.DatasetDict):
                    if split not in part:
                        raise DataError(f"{key}: {source} has splits {list(part)}, not {split!r}; set data.split")
                    part = part[split]
            else:
                part = datasets.load_dataset(source, split=split)
        except DataError:
            raise
        except Exception as exc:  # datasets raises many types for a bad file; all are the user's data
            raise DataError(f"{key}: cannot read {source}: {str(exc).splitlines()[0][:200]}") from None
        parts.append(part)
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(dataset) == 0:
        raise DataError(f"{key}: {', '.join(_as_list(spec))} has no rows")
    return dataset


def required_columns(data: DataSection) -> list[str]:
    columns = data.columns
    return {
        "text": [columns.text],
        "alpaca": [columns.instruction, columns.output],
        "chat": [columns.messages],
        "prompt_completion": [columns.prompt, columns.completion],
    }[data.format]


def check_fields(dataset, data: DataSection, key: str = "data.train") -> None:
    """Every row has the fields its format needs, with a row number for the first that does not."""
    needed = required_columns(data)
    missing_columns = [c for c in needed if c not in dataset.column_names]
    if missing_columns:
        raise DataError(
            f"{key}: no column `{missing_columns[0]}` for format {data.format} (columns: {', '.join(dataset.column_names)}); "
            f"rename it or map it with data.columns.{_column_key(data, missing_columns[0])}"
        )
    for column in needed:
        for index, value in enumerate(dataset[column]):
            if value is None or (isinstance(value, str) and not value.strip() and column != data.columns.input):
                raise DataError(f"{key}: row {index + 1} has no `{column}`; every {data.format} row needs it")


def _column_key(data: DataSection, column: str) -> str:
    for name, value in data.columns.model_dump().items():
        if value == column:
            return name
    return "text"
