"""Loading a task's data: raw rows of one original split, and the rendered train/validation/test splits.

Rows come from a generated task's own generator (the quickstart's synthetic tasks), a custom task's own
`data_files` (the data folder does not apply to them), or, for built-in tasks, from
`<data_dir>/<task>/<split>.jsonl|.csv|.parquet` when a data folder is given (argument, else the `DEPT_DATA_DIR`
environment variable), or else from the Hugging Face hub (`hub.py`: pinned revision, optional local mirror).
MRQA tasks keep only their `subset` rows (a local file without that column is taken to hold one subset already).

MNLI: test comes from `validation_matched` and validation from `validation_mismatched`. The shipped data has
only the matched set, named `validation.jsonl`; that name is accepted for validation_matched. Files are read
only for the splits asked for, so `splits=("train", "test")` works without a mismatched file, and asking for
validation without one raises an error that says so.

Bad rows: a row that cannot be rendered (missing column, label outside the label set, WSC span not found...)
never takes a whole task down by itself. While such rows stay under the task's `bad_row_tolerance` (1% unless
the task says otherwise) of a split they are skipped, counted and logged with their ids; at or above it the
split is refused with one line naming the first bad row and its problem.

Pass a dict as `provenance` to learn where each original split came from (file path, or hub id, config,
revision and the resolved commit) and which rows were skipped: that is what a run should record.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.tasks.hub import DATA_DIR_ENV, hub_name, load_hub_rows
from pipeline.tasks.readers import SUFFIXES, find_split_file, read_rows
from pipeline.tasks.registry import get_task
from pipeline.tasks.sampling import kshot_sample, mixture  # noqa: F401  (part of this module's API)
from pipeline.tasks.splits import SPLIT_SEED, SPLITS, apply_split_rule, original_split_of
from pipeline.tasks.task import Task, row_id

log = logging.getLogger(__name__)
SHOWN_IDS = 20  # a warning names at most this many skipped rows (the provenance record keeps them all)


def _as_task(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The local data folder: the argument, else $DEPT_DATA_DIR; None means the hub."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen) if chosen is not None else None


def _read(task: Task, split: str, data_dir) -> tuple[list[dict], dict]:
    """Rows of one original split and a record of where they came from (`where` is for messages)."""
    if task.data_files:
        path = Path(task.data_file(split))
        return read_rows(path), {"source": "file", "location": str(path), "where": str(path)}
    root = resolve_data_dir(data_dir)
    if root is None:
        rows, record = load_hub_rows(task, split)
        return rows, {**record, "where": f"hub dataset {hub_name(task)} split {split}"}
    stems = (split,) + tuple(alias for name, alias in task.split_aliases if name == split)
    path = find_split_file(root / task.name, stems)
    if path is None:
        tried = " or ".join(f"{root / task.name / stem}{{{','.join(SUFFIXES)}}}" for stem in stems)
        raise PipelineError(
            f"no {split!r} data for task {task.name!r}: {tried} does not exist; add the file, "
            f"unset {DATA_DIR_ENV}/data_dir to download it, or ask only for splits that do not need it"
        )
    return read_rows(path), {"source": "file", "location": str(path), "where": str(path)}


def _read_filtered(task: Task, split: str, data_dir) -> tuple[list[dict], dict]:
    rows, record = _read(task, split, data_dir)
    if task.row_filter is not None:
        column, value = task.row_filter
        # A local file without the column is taken to hold that subset only.
        if rows and column in rows[0]:
            rows = [row for row in rows if row.get(column) == value]
            record["where"] = f"{record['where']} ({column}={value})"
    if not rows:
        raise PipelineError(f"{record['where']} has no rows for task {task.name!r}: check the file")
    return rows, record


def render_rows(task: Task, rows: list[dict], where: str) -> tuple[list[dict], list[dict]]:
    """(rendered rows, skipped rows) under the task's bad-row policy; skipped rows are `{"id", "row", "error"}`.

    Raises one line naming the first bad row when bad rows reach `task.bad_row_tolerance` of the split.
    """
    rendered, bad = [], []
    for number, row in enumerate(rows):
        ident = row_id(row, number)
        try:
            rendered.append({"id": ident, **task.render(row)})
        except PipelineError as err:
            bad.append({"id": ident, "row": number + 1, "error": str(err)})
    if not bad:
        return rendered, bad
    share = len(bad) / len(rows)
    first = f"row {bad[0]['row']} (id {bad[0]['id']!r}): {bad[0]['error']}"
    if share >= task.bad_row_tolerance:
        if len(bad) == 1:
            raise PipelineError(f"{where} {first}")
        raise PipelineError(
            f"{where}: {len(bad)} of {len(rows)} rows ({share:.1%}) cannot be rendered for task {task.name!r}, "
            f"at or above its bad_row_tolerance of {task.bad_row_tolerance:.1%}; first: {first}; fix the data"
        )
    shown = ", ".join(repr(b["id"]) for b in bad[:SHOWN_IDS]) + (", ..." if len(bad) > SHOWN_IDS else "")
    log.warning("%s: skipped %d of %d rows (%.2f%%) that task %r cannot render (ids %s); first: %s",
                where, len(bad), len(rows), 100 * share, task.name, shown, first)
    return rendered, bad


def _load_rendered(task: Task, split: str, data_dir, provenance: dict | None) -> tuple[list[dict], list[dict]]:
    """(raw rows kept, rendered rows) of one original split."""
    if task.generate is not None:
        rendered = task.generate(split)  # generated rows are rendered already
        if provenance is not None:
            provenance[split] = {"source": "generated", "location": task.name, "rows": len(rendered), "skipped": []}
        return rendered, rendered
    rows, record = _read_filtered(task, split, data_dir)
    rendered, bad = render_rows(task, rows, record.pop("where"))
    if provenance is not None:
        provenance[split] = {**record, "rows": len(rendered), "skipped": [b["id"] for b in bad]}
    skipped = {b["row"] - 1 for b in bad}
    return [row for number, row in enumerate(rows) if number not in skipped], rendered


def load_raw_split(task: Task | str, split: str, data_dir: str | Path | None = None,
                   provenance: dict | None = None) -> list[dict]:
    """The raw rows (hub column names) of one original split, checked: every required column present and
    every label in the task's label set; rows that cannot be rendered are handled by the bad-row policy.
    `split` is a file/hub split name ("train", "validation_matched")."""
    return _load_rendered(_as_task(task), split, data_dir, provenance)[0]


def load_task_splits(task: Task | str, data_dir: str | Path | None = None, split_seed: int = SPLIT_SEED,
                     splits: tuple[str, ...] = SPLITS, provenance: dict | None = None) -> dict[str, list[dict]]:
    """`{"train", "validation", "test"}` (or the `splits` asked for) as lists of rendered rows
    `{"id", "source", "target"[, "answers"]}`, formed by the task's split rule (see `splits.py`).

    `provenance`, when given, is filled with one record per original split read (see the module docstring)."""
    task = _as_task(task)
    splits = tuple(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise PipelineError(f"splits {splits!r} must be a non-empty subset of {', '.join(SPLITS)}")
    loaded: dict[str, list[dict]] = {}

    def fetch(original: str) -> list[dict]:
        if original not in loaded:
            users = [s for s in splits if original_split_of(task, s) == original]
            try:
                loaded[original] = _load_rendered(task, original, data_dir, provenance)[1]
            except PipelineError as err:
                context = f"split rule {task.split_rule!r} takes {', '.join(users)} from it"
                raise PipelineError(f"{err} ({context})") from None
        return loaded[original]

    return apply_split_rule(task, splits, fetch, split_seed)
