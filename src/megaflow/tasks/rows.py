"""Rows of a task file: JSONL, Parquet, or a Hugging Face `datasets` directory.

`read_rows` yields ``(row_number, row)`` in file order, row numbers from 1 (a JSONL
file's line number; a table's row index + 1). A JSONL line that is not a JSON object
is a `RowError` of its own; every other line still loads. A file that cannot be read
at all (missing, not Parquet, no data files) is an `InvalidRequestError`.

A ``save_to_disk`` directory is read with pyarrow alone (its ``state.json`` lists the
Arrow stream files); a ``DatasetDict`` directory needs ``split`` unless it has one.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from megaflow.core.errors import InvalidRequestError


class RowError(BaseModel):
    """Why one row of a task file did not load."""

    model_config = ConfigDict(frozen=True)

    source: str
    row: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"field {self.field!r}: " if self.field else ""
        return f"{self.source}: row {self.row}: {where}{self.message}"


Row = dict[str, Any] | RowError


def detect_format(path: Path) -> str:
    """'jsonl', 'parquet' or 'datasets' for a task file or directory."""
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return "datasets"
        raise InvalidRequestError(f"{path} is a directory but not a `datasets` save_to_disk one")
    if not path.is_file():
        raise InvalidRequestError(f"no task file at {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".parquet", ".pq"):
        return "parquet"
    with path.open("rb") as f:
        head = f.read(4)
    return "parquet" if head == b"PAR1" else "jsonl"


def read_rows(path: Path, split: str = "") -> Iterator[tuple[int, Row]]:
    """``(row_number, row or RowError)`` of the file at ``path``."""
    fmt = detect_format(path)
    if fmt == "jsonl":
        yield from _jsonl(path)
    elif fmt == "parquet":
        yield from _table_rows(_parquet(path))
    else:
        yield from _table_rows(_datasets(path, split))


def _jsonl(path: Path) -> Iterator[tuple[int, Row]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                value = json.loads(raw)
            except ValueError as exc:
                yield (
                    number,
                    RowError(
                        source=str(path), row=number, field="", message=f"not valid JSON: {exc}"
                    ),
                )
                continue
            if not isinstance(value, dict):
                yield (
                    number,
                    RowError(
                        source=str(path),
                        row=number,
                        field="",
                        message=f"a row must be a JSON object, not {type(value).__name__}",
                    ),
                )
                continue
            yield number, value


def _table_rows(table: Any) -> Iterator[tuple[int, Row]]:
    for index, row in enumerate(table.to_pylist()):
        yield index + 1, row


def _parquet(path: Path) -> Any:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except Exception as exc:  # pyarrow's errors: ArrowInvalid, OSError...
        raise InvalidRequestError(f"cannot read {path} as Parquet: {exc}") from None


def _datasets(path: Path, split: str) -> Any:
    import pyarrow as pa

    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        if not split:
            if len(splits) != 1:
                raise InvalidRequestError(f"{path} has splits {splits}: name one (split=...)")
            split = splits[0]
        if split not in splits:
            raise InvalidRequestError(f"{path} has no split {split!r} (it has {splits})")
        path = path / split
    try:
        state = json.loads((path / "state.json").read_text())
        files = [path / f["filename"] for f in state["_data_files"]]
        tables = []
        for file in files:
            with pa.memory_map(str(file)) as source:
                tables.append(pa.ipc.open_stream(source).read_all())
    except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
        raise InvalidRequestError(f"cannot read {path} as a `datasets` directory: {exc}") from None
    if not tables:
        raise InvalidRequestError(f"{path} lists no data files")
    return pa.concat_tables(tables)
