"""Loading a task's data: raw rows of one original split, and the rendered train/validation/test splits.

Rows come from a custom task's own `data_files` (the data folder does not apply to them); for built-in tasks
from `<data_dir>/<task>/<split>.jsonl|.csv|.parquet` when a data folder is given (argument, else the
`DEPT_DATA_DIR` environment variable), or else from the Hugging Face hub with
`datasets.load_dataset(hub_path, hub_config, split=...)`. MRQA tasks keep only their `subset` rows (a local
file without that column is taken to hold one subset already).

MNLI: test comes from `validation_matched` and validation from `validation_mismatched`. The shipped data has
only the matched set, named `validation.jsonl`; that name is accepted for validation_matched. Files are read
only for the splits asked for, so `splits=("train", "test")` works without a mismatched file, and asking for
validation without one raises an error that says so.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.tasks.readers import SUFFIXES, find_split_file, read_rows
from pipeline.tasks.registry import get_task
from pipeline.tasks.sampling import kshot_sample, mixture  # noqa: F401  (part of this module's API)
from pipeline.tasks.splits import SPLIT_SEED, SPLITS, apply_split_rule, original_split_of
from pipeline.tasks.task import ID_COLUMNS, Task, row_id

DATA_DIR_ENV = "DEPT_DATA_DIR"


def _as_task(task: Task | str) -> Task:
    return get_task(task) if isinstance(task, str) else task


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The local data folder: the argument, else $DEPT_DATA_DIR; None means the hub."""
    chosen = data_dir if data_dir not in (None, "") else os.environ.get(DATA_DIR_ENV) or None
    return Path(chosen) if chosen is not None else None


def _hub_name(task: Task) -> str:
    return "/".join(filter(None, (task.hub_path, task.hub_config)))


def _hub_rows(task: Task, split: str) -> list[dict]:
    if task.hub_path is None:
        raise PipelineError(f"task {task.name!r} has no hub dataset: give it data files")
    hub_name = _hub_name(task)
    import datasets  # heavy; only needed without local files

    try:
        dataset = datasets.load_dataset(task.hub_path, task.hub_config, split=split)
    except Exception as err:  # network, authentication, unknown split...: the hub's many error types
        raise PipelineError(
            f"could not load split {split!r} of {hub_name} from the Hugging Face hub ({type(err).__name__}: {err}); "
            f"check the network or set {DATA_DIR_ENV} to a folder holding {task.name}/{split}.jsonl"
        ) from err
    if task.row_filter is not None:
        column, value = task.row_filter
        # Filter before materialising: MRQA's train split holds ~500k rows with tokenised contexts.
        dataset = dataset.filter(lambda cell: cell == value, input_columns=column)
    wanted = set(task.required_columns) | set(ID_COLUMNS)
    return dataset.select_columns([c for c in dataset.column_names if c in wanted]).to_list()


def _read(task: Task, split: str, data_dir) -> tuple[list[dict], str]:
    """Rows of one original split and a description of where they came from (for messages)."""
    if task.data_files:
        path = Path(task.data_file(split))
        return read_rows(path), str(path)
    root = resolve_data_dir(data_dir)
    if root is None:
        return _hub_rows(task, split), f"hub dataset {_hub_name(task)} split {split}"
    stems = (split,) + tuple(alias for name, alias in task.split_aliases if name == split)
    path = find_split_file(root / task.name, stems)
    if path is None:
        tried = " or ".join(f"{root / task.name / stem}{{{','.join(SUFFIXES)}}}" for stem in stems)
        raise PipelineError(
            f"no {split!r} data for task {task.name!r}: {tried} does not exist; add the file, "
            f"unset {DATA_DIR_ENV}/data_dir to download it, or ask only for splits that do not need it"
        )
    return read_rows(path), str(path)


def _read_filtered(task: Task, split: str, data_dir) -> tuple[list[dict], str]:
    rows, where = _read(task, split, data_dir)
    if task.row_filter is not None:
        column, value = task.row_filter
        # A local file without the column is taken to hold that subset only.
        if rows and column in rows[0]:
            rows = [row for row in rows if row.get(column) == value]
            where = f"{where} ({column}={value})"
    if not rows:
        raise PipelineError(f"{where} has no rows for task {task.name!r}: check the file")
    return rows, where


def _render_all(task: Task, rows: list[dict], where: str) -> list[dict]:
    rendered = []
    for number, row in enumerate(rows):
        try:
            rendered.append({"id": row_id(row, number), **task.render(row)})
        except PipelineError as err:
            raise PipelineError(f"{where} row {number + 1} (id {row_id(row, number)!r}): {err}") from None
    return rendered


def load_raw_split(task: Task | str, split: str, data_dir: str | Path | None = None) -> list[dict]:
    """The raw rows (hub column names) of one original split, checked: every required column present and
    every label in the task's label set. `split` is a file/hub split name ("train", "validation_matched")."""
    task = _as_task(task)
    rows, where = _read_filtered(task, split, data_dir)
    _render_all(task, rows, where)  # rendering checks columns, labels and task-specific text (WSC spans)
    return rows


def load_task_splits(task: Task | str, data_dir: str | Path | None = None, split_seed: int = SPLIT_SEED,
                     splits: tuple[str, ...] = SPLITS) -> dict[str, list[dict]]:
    """`{"train", "validation", "test"}` (or the `splits` asked for) as lists of rendered rows
    `{"id", "source", "target"[, "answers"]}`, formed by the task's split rule (see `splits.py`)."""
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
                loaded[original] = _render_all(task, *_read_filtered(task, original, data_dir))
            except PipelineError as err:
                context = f"split rule {task.split_rule!r} takes {', '.join(users)} from it"
                raise PipelineError(f"{err} ({context})") from None
        return loaded[original]

    return apply_split_rule(task, splits, fetch, split_seed)
