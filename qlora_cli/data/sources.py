"""Where rows come from: files (.jsonl .json .csv .parquet), saved datasets folders and hub
datasets, loaded into one datasets.Dataset; the fields each format needs, checked per row.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Iterator, Optional, Union

from qlora_cli.data import preference
from qlora_cli.data.chat import check_messages, conversation
from qlora_cli.errors import DataError, library_message
from qlora_cli.recipe.paths import is_local_path
from qlora_cli.recipe.schema import DataSection

_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _as_list(spec) -> list[str]:
    """The paths of a data.train / data.eval value (a path, or a list of paths and sources)."""
    return [spec] if isinstance(spec, str) else [item if isinstance(item, str) else item.path for item in spec]


def check_sources(spec: Union[str, list[str]], key: str) -> None:
    """Fail fast on local data paths that do not exist (hub ids are checked when loaded)."""
    for source in _as_list(spec):
        if Path(source).expanduser().exists():
            continue
        if is_local_path(source, tuple(_FILE_BUILDERS)):
            raise DataError(f"{key}: {source} not found; give a .jsonl/.json/.csv/.parquet file, a saved dataset folder, or a hub id")
        if Path(source).suffix:
            raise DataError(f"{key}: {source} not found")


def load_rows(spec: Union[str, list[str]], split: str = "train", key: str = "data.train", subset: Optional[str] = None):
    """Load one or more sources into a single datasets.Dataset (`subset`: a hub dataset's configuration)."""
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
                problem = encoding_problem(path) if builder != "parquet" else None
                if problem:
                    raise DataError(f"{key}: {problem}")
                with _quiet(datasets):
                    part = datasets.load_dataset(builder, data_files=str(path), split="train")
            elif path.is_dir() and not _saved_dataset(path):  # a dataset repository on disk: read as the hub's
                with _quiet(datasets):
                    part = datasets.load_dataset(str(path), subset, split=split)
            elif path.is_dir():
                part = datasets.load_from_disk(str(path))
                if isinstance(part, datasets.DatasetDict):
                    if split not in part:
                        raise DataError(f"{key}: {source} has splits {list(part)}, not {split!r}; set data.split")
                    part = part[split]
            else:
                part = datasets.load_dataset(source, subset, split=split)
        except DataError:
            raise
        except Exception as exc:  # datasets raises many types for a bad file; all are the user's data
            problem = file_problem(path) if path.is_file() else None
            raise DataError(f"{key}: {problem or f'cannot read {source}: {library_message(exc)}'}") from None
        parts.append(part)
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(dataset) == 0:
        raise DataError(f"{key}: {', '.join(_as_list(spec))} has no rows")
    return dataset


def stream_rows(source: str, split: str = "train", key: str = "data.train", subset: Optional[str] = None) -> Iterator[dict]:
    """The raw rows of one source, read as they are consumed (data.streaming): a .jsonl file line by
    line with the same checks as a loaded one (encoding, malformed line, both named with the line),
    anything else through datasets' streaming readers (a saved folder as an iterable view of it)."""
    import datasets

    check_sources(source, key)
    path = Path(source).expanduser()
    try:
        if path.is_file() and path.suffix.lower() == ".jsonl":
            yield from _jsonl_rows(path, key)
            return
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DataError(f"{key}: {source} has an unsupported extension; use .jsonl, .json, .csv or .parquet")
            with _quiet(datasets):
                rows = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True)
        elif path.is_dir() and _saved_dataset(path):
            rows = datasets.load_from_disk(str(path))
            if isinstance(rows, datasets.DatasetDict):
                if split not in rows:
                    raise DataError(f"{key}: {source} has splits {list(rows)}, not {split!r}; set data.split")
                rows = rows[split]
            rows = rows.to_iterable_dataset()
        else:  # a hub dataset, or a dataset repository on disk
            with _quiet(datasets):
                rows = datasets.load_dataset(str(path) if path.is_dir() else source, subset, split=split, streaming=True)
        yield from rows
    except DataError:
        raise
    except Exception as exc:  # datasets raises many types for a bad file; all are the user's data
        problem = file_problem(path) if path.is_file() else None
        raise DataError(f"{key}: {problem or f'cannot read {source}: {library_message(exc)}'}") from None


def _jsonl_rows(path: Path, key: str) -> Iterator[dict]:
    """JSON Lines rows one at a time (a UTF-8 BOM allowed), without reading the file ahead: a line
    that is not UTF-8 or not a JSON object is an error naming its line when the stream reaches it."""
    if path.stat().st_size == 0:
        raise DataError(f"{key}: {path} is empty (no rows); add rows or point at another file")
    with open(path, "rb") as handle:
        head = handle.read(4)
        for bom, name in _BOMS:
            if head.startswith(bom):
                raise DataError(f"{key}: {path} is {name} text (it starts with a {name} byte-order mark); save it as UTF-8")
        handle.seek(3 if head.startswith(b"\xef\xbb\xbf") else 0)
        offset = handle.tell()
        for number, line in enumerate(handle, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as exc:
                byte = line[exc.start]
                guess = " (it looks like Latin-1 / Windows-1252)" if 0x80 <= byte <= 0xFF else ""
                raise DataError(f"{key}: {path} is not UTF-8: byte 0x{byte:02X} at offset {offset + exc.start} (line {number}) "
                                f"cannot be decoded{guess}; save it as UTF-8") from None
            offset += len(line)
            if not text.strip():
                continue
            if problem := _json_error(text):
                raise DataError(f"{key}: {path} line {number}: {problem}; fix or remove that line")
            yield json.loads(text)


def _saved_dataset(folder: Path) -> bool:
    """A folder written by datasets' save_to_disk (a Dataset or a DatasetDict)."""
    return any((folder / name).is_file() for name in ("dataset_dict.json", "state.json", "dataset_info.json"))


@contextlib.contextmanager
def _quiet(datasets) -> Iterator[None]:
    """datasets logs a bad file as an error line of its own ("Failed to load JSON ... in row 2",
    0-based), beside the one line we print: keep it out, our message names the line."""
    level = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)


def file_problem(path: Path) -> Optional[str]:
    """What is wrong with a data file datasets could not read, said the way an editor shows it: an
    empty file, text that is not UTF-8, or the first line (1-based) of a .jsonl / .json file that
    is not a JSON object. None when it finds nothing (datasets' own message is used then)."""
    suffix = path.suffix.lower()
    empty = f"{path} is empty (no rows); add rows or point at another file"
    try:
        if path.stat().st_size == 0:
            return empty
        if suffix not in (".jsonl", ".json", ".csv"):
            return None
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        return f"{path} is not UTF-8 text (byte {exc.start + 1} cannot be decoded); save it as UTF-8"
    except OSError:
        return None
    lines = text.splitlines()
    if not text.strip():
        return empty
    if suffix == ".csv":
        return None
    if suffix == ".json":  # one JSON document (an array of rows), or JSON Lines under another name
        try:
            json.loads(text)
            return None  # valid JSON: datasets' complaint is about its shape, not its syntax
        except json.JSONDecodeError as exc:
            if _json_error(next(line for line in lines if line.strip())) is not None:  # not JSON Lines either
                return f"{path} line {exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno}); fix that line"
    for number, line in enumerate(lines, start=1):
        if line.strip() and (problem := _json_error(line)):
            return f"{path} line {number}: {problem}; fix or remove that line"
    return None


_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"), (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def encoding_problem(path: Path, block: int = 1 << 20) -> Optional[str]:
    """Why a text data file is not UTF-8 (with or without a byte-order mark), naming the encoding
    its BOM declares or the first byte that cannot be decoded (offset and line); None if it is.
    Read in blocks: a file too big for memory is checked all the same."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with open(path, "rb") as handle:
        head = handle.read(4)
        for bom, name in _BOMS:
            if head.startswith(bom):
                return f"{path} is {name} text (it starts with a {name} byte-order mark); save it as UTF-8"
        handle.seek(0)
        while chunk := handle.read(block):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                byte = chunk[exc.start]
                guess = " (it looks like Latin-1 / Windows-1252)" if 0x80 <= byte <= 0xFF else ""
                return (f"{path} is not UTF-8: byte 0x{byte:02X} at offset {offset + exc.start} (line {line + chunk[:exc.start].count(10)}) "
                        f"cannot be decoded{guess}; save it as UTF-8")
            offset, line = offset + len(chunk), line + chunk.count(10)
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return f"{path} is not UTF-8: it ends inside a multi-byte character (offset {offset}); save it as UTF-8"
    return None


def _json_error(line: str) -> Optional[str]:
    """Why one JSON Lines line is not a row (a JSON object), or None."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg}, column {exc.colno})"
    return None if isinstance(row, dict) else f"a row must be a JSON object, not {type(row).__name__}"


def required_columns(data: DataSection) -> list[str]:
    columns = data.columns
    if data.format in preference.FORMATS:
        return preference.required_columns(data)
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


def check_row(row: dict, data: DataSection, where: str) -> None:
    """One row as its format needs it, `where` naming the file and row (the streaming path checks
    each row as it is read, with the rules check_rows applies to a loaded source)."""
    for column in required_columns(data):
        value = row.get(column)
        if value is None or (isinstance(value, str) and not value.strip() and column != data.columns.input):
            present = ", ".join(row) or "none"
            raise DataError(f"{where} has no `{column}` (its fields: {present}); every {data.format} row needs it "
                            f"(rename it or map it with data.columns.{_column_key(data, column)})")
    if data.format == "chat":
        columns = data.columns
        messages, _, added = conversation(row, columns.messages, columns.tools, columns.system)
        check_messages(messages, where, added)


def check_rows(dataset, data: DataSection, where: str) -> None:
    """Every row of one source as its format needs it, before anything is tokenized or split (so
    a row number is the row of that file): fields present, and chat messages well formed."""
    check_fields(dataset, data, where)
    if data.format != "chat":
        return
    columns = data.columns
    for index, row in enumerate(dataset):
        messages, _, added = conversation(row, columns.messages, columns.tools, columns.system)
        check_messages(messages, f"{where}: row {index + 1}", added)


def _column_key(data: DataSection, column: str) -> str:
    for name, value in data.columns.model_dump().items():
        if value == column:
            return name
    return "text"
