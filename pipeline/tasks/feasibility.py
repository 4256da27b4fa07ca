"""Checks a recipe runs at its start (`dept run`, `--dry_run`) so that no job fails hours in on something the data
already shows: a task that does not exist, a custom task that does not parse, a data file that is missing, a
k-shot size the target's training rows cannot supply. Reads local files only (the hub is checked when a job
loads it) and imports neither torch nor `datasets`.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.tasks.loading import rendered_split_file, resolve_data_dir
from pipeline.tasks.sampling import kshot_positions
from pipeline.tasks.specs import task_from_spec
from pipeline.tasks.splits import SPLITS, original_split_of


def _local(task, data_dir) -> bool:
    """Whether the task's rows come from local files or a generator (not the hub)."""
    return bool(task.data_files) or task.generate is not None or resolve_data_dir(data_dir) is not None


def check_job_data(data, seed: int) -> None:
    """Raise a one-line PipelineError when a job with these `data` arguments (config.DataArgs) cannot run."""
    if data.train_file:
        if not Path(data.train_file).is_file():
            raise PipelineError(f"train_file {data.train_file} does not exist: pass a JSONL with source/target")
        return
    wanted = SPLITS if data.evaluate else ("train",)
    for spec in data.tasks:
        task = task_from_spec(spec)
        if not _local(task, data.data_dir):
            continue
        originals = dict.fromkeys(original_split_of(task, split) for split in wanted)
        files = {}
        for original in originals:
            try:  # renders into the cache the job then reuses (memory-mapped; no rows held)
                files[original] = rendered_split_file(task, original, data.data_dir)
            except PipelineError as err:
                users = [s for s in wanted if original_split_of(task, s) == original]
                raise PipelineError(f"{err} (needed for {', '.join(users)})") from None
        if data.k is not None:
            targets = _column(files[original_split_of(task, "train")], "target")
            kshot_positions([{"target": t} for t in targets], data.k, seed, task)


def _column(path: Path, name: str) -> list:
    """One column of a cached Arrow file, read with pyarrow alone (no `datasets`, no torch)."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_stream(source).read_all().column(name).to_pylist()
