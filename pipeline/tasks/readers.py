"""Reading one split's rows from a local file: JSON Lines, CSV or parquet.

Every reader streams: `iter_rows(path)` yields one dict per row and holds only the row it is on (parquet: one
record batch), so a 560,000-row split can be rendered into an Arrow table without ever being a Python list.
`read_rows(path)` is the list of the same rows, for small splits.

JSONL is parsed line by line so a corrupt line is reported with its file and line number (blank lines are
skipped). CSV values are all text; the task's label converters accept "1" as well as 1. Parquet is read
with pyarrow, one record batch at a time.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError

SUFFIXES = (".jsonl", ".csv", ".parquet")
PARQUET_BATCH_ROWS = 4096


def iter_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise PipelineError(
                    f"{path} line {number} is not valid JSON ({err.msg}): fix or remove that line"
                ) from None
            if not isinstance(row, dict):
                raise PipelineError(f"{path} line {number} must be one JSON object {{column: value}}")
            yield row


def iter_csv(path: Path) -> Iterator[dict]:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would corrupt the first column name.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        for row in csv.DictReader(handle):
            if None in row:
                raise PipelineError(
                    f"{path} has a row with more fields than its header: quote fields that contain commas"
                )
            yield row


def iter_parquet(path: Path) -> Iterator[dict]:
    # pyarrow is the parquet engine of `datasets` (its dependency); `datasets.Dataset.from_parquet` would
    # also copy the file into the Hugging Face cache and print progress bars for no benefit here.
    import pyarrow.parquet

    try:
        batches = pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH_ROWS)
        for batch in batches:
            yield from batch.to_pylist()
    except PipelineError:
        raise
    except Exception as err:  # pyarrow raises several types for a damaged or non-parquet file
        raise PipelineError(f"{path} could not be read as parquet ({type(err).__name__}: {err})") from err


def read_jsonl(path: Path) -> list[dict]:
    return list(iter_jsonl(path))


def read_csv(path: Path) -> list[dict]:
    return list(iter_csv(path))


def read_parquet(path: Path) -> list[dict]:
    return list(iter_parquet(path))


def check_file(path: str | Path) -> Path:
    """The path, when it names an existing file with a readable suffix; else one line saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"data file {path} does not exist: create it or fix the path")
    if path.suffix not in SUFFIXES:
        raise PipelineError(f"data file {path} must end in {', '.join(SUFFIXES)}")
    return path


def iter_rows(path: str | Path) -> Iterator[dict]:
    """The rows of a .jsonl, .csv or .parquet file, one at a time (the file is checked before the first one)."""
    path = check_file(path)
    readers = {".jsonl": iter_jsonl, ".csv": iter_csv, ".parquet": iter_parquet}
    return readers[path.suffix](path)


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a .jsonl, .csv or .parquet file."""
    return list(iter_rows(path))


def find_split_file(folder: Path, stems: tuple[str, ...]) -> Path | None:
    """The first existing `<folder>/<stem><suffix>`, trying stems in order, then suffixes in order."""
    for stem in stems:
        for suffix in SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None
