"""Reading one split's rows from a local file: JSON Lines, CSV or parquet.

JSONL is parsed line by line so a corrupt line is reported with its file and line number (blank lines are
skipped). CSV values are all text; the task's label converters accept "1" as well as 1. Parquet is read
with pyarrow.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from pipeline.errors import PipelineError

SUFFIXES = (".jsonl", ".csv", ".parquet")


def read_jsonl(path: Path) -> list[dict]:
    rows = []
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
            rows.append(row)
    return rows


def read_csv(path: Path) -> list[dict]:
    # utf-8-sig: spreadsheet exports often start with a byte-order mark that would corrupt the first column name.
    with open(path, encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    if any(None in row for row in rows):
        raise PipelineError(f"{path} has a row with more fields than its header: quote fields that contain commas")
    return rows


def read_parquet(path: Path) -> list[dict]:
    # pyarrow is the parquet engine of `datasets` (its dependency); `datasets.Dataset.from_parquet` would
    # also copy the file into the Hugging Face cache and print progress bars for no benefit here.
    import pyarrow.parquet

    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a damaged or non-parquet file
        raise PipelineError(f"{path} could not be read as parquet ({type(err).__name__}: {err})") from err


def read_rows(path: str | Path) -> list[dict]:
    """All rows of a .jsonl, .csv or .parquet file."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"data file {path} does not exist: create it or fix the path")
    readers = {".jsonl": read_jsonl, ".csv": read_csv, ".parquet": read_parquet}
    if path.suffix not in readers:
        raise PipelineError(f"data file {path} must end in {', '.join(SUFFIXES)}")
    return readers[path.suffix](path)


def find_split_file(folder: Path, stems: tuple[str, ...]) -> Path | None:
    """The first existing `<folder>/<stem><suffix>`, trying stems in order, then suffixes in order."""
    for stem in stems:
        for suffix in SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None
