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

Tables: `load_task_tables` gives the splits as memory-mapped `datasets.Dataset`s (what a training job uses).
Each original split is read and rendered in one streaming pass into an Arrow file under the cache
(`tables.py`), keyed by the data's content (a file's sha256, a hub split's fingerprint), the task's definition
and this package's code; the bad-row policy applies during that pass. Every later call, rank, stage and job
opens the same file (a rendering pass happens once per key; `RENDER_PASSES` counts them in this process), and
the split rules select rows from it by index. `load_task_splits` is the same rows as lists of dicts.

Pass a dict as `provenance` to learn where each original split came from (file path, or hub id, config,
revision and the resolved commit) and which rows were skipped: that is what a run should record.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.tasks import tables
from pipeline.tasks.hub import DATA_DIR_ENV, hub_name, iter_table_rows, load_hub_rows, load_hub_table
from pipeline.tasks.readers import SUFFIXES, find_split_file, iter_rows, read_rows
from pipeline.tasks.registry import get_task
from pipeline.tasks.sampling import kshot_sample, mixture  # noqa: F401  (part of this module's API)
from pipeline.tasks.splits import SPLIT_SEED, SPLITS, apply_split_rule, original_split_of
from pipeline.tasks.task import Task, row_id

log = logging.getLogger(__name__)
SHOWN_IDS = 20  # a warning names at most this many skipped rows (the provenance record keeps them all)
RENDER_PASSES = 0  # rendering passes over a whole split made by this process (each is logged once)


def _as_task(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The local data folder: the argument, else $DEPT_DATA_DIR; None means the hub."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen) if chosen is not None else None


def local_task_folder(task: Task, data_dir: str | Path | None = None) -> Path | None:
    """The local folder holding a registered task's split files (`<data_dir>/<task>`), or None when there is none
    and its rows come from the hub."""
    root = resolve_data_dir(data_dir)
    return root / task.name if root is not None and (root / task.name).is_dir() else None


def _local_file(task: Task, split: str, data_dir) -> Path | None:
    """The file holding one original split, or None when it comes from the hub; one line when it is missing."""
    if task.data_files:
        return Path(task.data_file(split))
    root = resolve_data_dir(data_dir)
    if root is None:
        return None
    stems = (split,) + tuple(alias for name, alias in task.split_aliases if name == split)
    path = find_split_file(root / task.name, stems)
    if path is None:
        tried = " or ".join(f"{root / task.name / stem}{{{','.join(SUFFIXES)}}}" for stem in stems)
        raise PipelineError(
            f"no {split!r} data for task {task.name!r}: {tried} does not exist; add the file, "
            f"unset {DATA_DIR_ENV}/data_dir to download it, or ask only for splits that do not need it"
        )
    return path


def _read(task: Task, split: str, data_dir) -> tuple[list[dict], dict]:
    """Rows of one original split and a record of where they came from (`where` is for messages)."""
    path = _local_file(task, split, data_dir)
    if path is None:
        rows, record = load_hub_rows(task, split)
        return rows, {**record, "where": f"hub dataset {hub_name(task)} split {split}"}
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


# ----------------------------------------------------------------------------------------------- the bad-row policy


def _refuse_if_too_many(task: Task, bad: list[dict], total: int, where: str) -> None:
    """One line naming the first bad row when bad rows reach `task.bad_row_tolerance` of the split."""
    if not bad:
        return
    share = len(bad) / total
    if share >= task.bad_row_tolerance:
        first = f"row {bad[0]['row']} (id {bad[0]['id']!r}): {bad[0]['error']}"
        if len(bad) == 1:
            raise PipelineError(f"{where} {first}")
        raise PipelineError(
            f"{where}: {len(bad)} of {total} rows ({share:.1%}) cannot be rendered for task {task.name!r}, "
            f"at or above its bad_row_tolerance of {task.bad_row_tolerance:.1%}; first: {first}; fix the data"
        )


def _warn_skipped(task: Task, bad: list[dict], total: int, where: str) -> None:
    if not bad:
        return
    first = f"row {bad[0]['row']} (id {bad[0]['id']!r}): {bad[0]['error']}"
    shown = ", ".join(repr(b["id"]) for b in bad[:SHOWN_IDS]) + (", ..." if len(bad) > SHOWN_IDS else "")
    log.warning(
        "%s: skipped %d of %d rows (%.2f%%) that task %r cannot render (ids %s); first: %s",
        where,
        len(bad),
        total,
        100 * len(bad) / total,
        task.name,
        shown,
        first,
    )


def _counted_pass() -> int:
    global RENDER_PASSES
    RENDER_PASSES += 1
    return RENDER_PASSES


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
    count = _counted_pass()
    _refuse_if_too_many(task, bad, len(rows), where)
    log.debug("rendering pass %d of this process (a list): task %r, %s, %d rows", count, task.name, where, len(rows))
    _warn_skipped(task, bad, len(rows), where)
    return rendered, bad


def _load_rendered(task: Task, split: str, data_dir, provenance: dict | None) -> tuple[list[dict], list[dict]]:
    """(raw rows kept, rendered rows) of one original split, as lists (the raw rows' path; see `load_raw_split`)."""
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


def load_raw_split(
    task: Task | str, split: str, data_dir: str | Path | None = None, provenance: dict | None = None
) -> list[dict]:
    """The raw rows (hub column names) of one original split, checked: every required column present and
    every label in the task's label set; rows that cannot be rendered are handled by the bad-row policy.
    `split` is a file/hub split name ("train", "validation_matched")."""
    return _load_rendered(_as_task(task), split, data_dir, provenance)[0]


# ----------------------------------------------------------------------------------------------- rendered tables


def _filtered(task: Task, rows: Iterator[dict], where: str) -> tuple[Iterator[dict], str]:
    """MRQA's subset filter on a stream of rows (the hub's are filtered already): a local file whose first row
    lacks the column holds one subset."""
    if task.row_filter is None:
        return rows, where
    column, value = task.row_filter
    first = next(rows, None)
    if first is None:
        return iter(()), where
    stream = _chain(first, rows)
    if column not in first:
        return stream, where
    return (row for row in stream if row.get(column) == value), f"{where} ({column}={value})"


def _chain(first: dict, rest: Iterator[dict]) -> Iterator[dict]:
    yield first
    yield from rest


def _columns(task: Task) -> tuple[list[str], dict]:
    import pyarrow as pa

    columns, types = ["id", "source", "target"], {"source": pa.string(), "target": pa.string()}
    if task.kind == "qa":
        columns.append("answers")
        types["answers"] = pa.list_(pa.string())
    return columns, types


def _render_into(path: Path, task: Task, rows: Iterator[dict], where: str, key: str, suffix: str = "") -> None:
    """One streaming pass: render every row under the bad-row policy into the Arrow file `path` (atomically), with
    `<path>.json` holding the kept and skipped rows. Nothing is written when the split is refused."""
    columns, types = _columns(task)
    bad, total = [], 0
    with tables.RowWriter(path, key, columns, types) as writer:
        for number, row in enumerate(rows):
            total += 1
            ident = row_id(row, number)
            try:
                writer.add({"id": ident, **task.render(row)})
            except PipelineError as err:
                bad.append({"id": ident, "row": number + 1, "error": str(err)})
        if not total:
            raise PipelineError(f"{where} has no rows for task {task.name!r}: check the file")
        count = _counted_pass()
        _refuse_if_too_many(task, bad, total, where)
        log.debug(
            "rendering pass %d of this process: task %r, %s, %d rows into the cache", count, task.name, where, total
        )
        tables.write_json_atomic(
            _meta_path(path), {"rows": writer.rows, "total": total, "bad": bad, "where_suffix": suffix}
        )
        writer.commit()


def _write_generated(path: Path, rows: list[dict], key: str) -> None:
    columns = list(dict.fromkeys(name for row in rows for name in row))
    with tables.RowWriter(path, key, columns) as writer:
        for row in rows:
            writer.add(row)
        tables.write_json_atomic(_meta_path(path), {"rows": len(rows), "total": len(rows), "bad": []})
        writer.commit()


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def rendered_split_file(
    task: Task | str, split: str, data_dir: str | Path | None = None, provenance: dict | None = None
) -> Path:
    """The Arrow file of one original split's rendered rows (`id`, `source`, `target`[, `answers`]), rendered now
    unless the cache holds it already. Needs pyarrow only (no `datasets`) for local files and generated tasks.

    Warns about skipped rows (and fills `provenance[split]`) on every call, rendered now or not."""
    task = _as_task(task)
    folder = tables.cache_dir("rendered")
    if task.generate is not None:
        rows = task.generate(split)
        key = tables.digest("generated", task.name, split, rows)
        path = folder / f"{task.name}-{split}-{key}.arrow"
        tables.build_once(path, lambda target: _write_generated(target, rows, key))
        if provenance is not None:
            provenance[split] = {"source": "generated", "location": task.name, "rows": len(rows), "skipped": []}
        return path
    file = _local_file(task, split, data_dir)
    if file is None:
        table, record = load_hub_table(task, split)
        where = f"hub dataset {hub_name(task)} split {split}"
        source = {"hub": {k: v for k, v in record.items() if k != "location"}, "fingerprint": table._fingerprint}
        stream = lambda: iter_table_rows(table)  # noqa: E731
    else:
        record = {"source": "file", "location": str(file)}
        where = str(file)
        source = {"file": tables.file_digest(file), "suffix": file.suffix}
        stream = lambda: iter_rows(file)  # noqa: E731
    key = tables.digest("rendered", tables.task_identity(task), split, source)
    path = folder / f"{task.name}-{split}-{key}.arrow"

    def build(target: Path) -> None:
        rows, described = _filtered(task, stream(), where)
        _render_into(target, task, rows, described, key, described[len(where) :])

    tables.build_once(path, build)
    meta = json.loads(_meta_path(path).read_text())
    _warn_skipped(task, meta["bad"], meta["total"], where + meta.get("where_suffix", ""))
    if provenance is not None:
        provenance[split] = {**record, "rows": meta["rows"], "skipped": [b["id"] for b in meta["bad"]]}
    return path


def load_rendered_table(
    task: Task | str, split: str, data_dir: str | Path | None = None, provenance: dict | None = None
):
    """One original split's rendered rows as a memory-mapped `datasets.Dataset` (see `rendered_split_file`)."""
    return tables.open_table(rendered_split_file(task, split, data_dir, provenance))


def _check_splits(splits) -> tuple[str, ...]:
    splits = tuple(splits)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise PipelineError(f"splits {splits!r} must be a non-empty subset of {', '.join(SPLITS)}")
    return splits


def load_task_tables(
    task: Task | str,
    data_dir: str | Path | None = None,
    split_seed: int = SPLIT_SEED,
    splits: tuple[str, ...] = SPLITS,
    provenance: dict | None = None,
) -> dict:
    """`{"train", "validation", "test"}` (or the `splits` asked for) as memory-mapped `datasets.Dataset`s of
    rendered rows `{"id", "source", "target"[, "answers"]}`, formed by the task's split rule (see `splits.py`): the
    rule's shuffles are index mappings over the one rendered file of each original split.

    `provenance`, when given, is filled with one record per original split read (see the module docstring)."""
    task = _as_task(task)
    splits = _check_splits(splits)
    loaded: dict = {}

    def fetch(original: str):
        if original not in loaded:
            users = [s for s in splits if original_split_of(task, s) == original]
            try:
                loaded[original] = load_rendered_table(task, original, data_dir, provenance)
            except PipelineError as err:
                context = f"split rule {task.split_rule!r} takes {', '.join(users)} from it"
                raise PipelineError(f"{err} ({context})") from None
        return loaded[original]

    return apply_split_rule(task, splits, fetch, split_seed)


def load_task_splits(
    task: Task | str,
    data_dir: str | Path | None = None,
    split_seed: int = SPLIT_SEED,
    splits: tuple[str, ...] = SPLITS,
    provenance: dict | None = None,
) -> dict[str, list[dict]]:
    """`load_task_tables` as lists of row dicts `{"id", "source", "target"[, "answers"]}`: for small splits
    (evaluation, inference); a training job keeps the tables."""
    return {
        split: table.to_list()
        for split, table in load_task_tables(task, data_dir, split_seed, splits, provenance).items()
    }
