"""Tasks: the registry of DePT's datasets and the quickstart's synthetic tasks, custom tasks, data loading
(local files, the hub, a hub mirror), split rules and sampling. Importing this package imports neither torch nor
`datasets`: `dept run --dry_run` uses it."""

from pipeline.tasks.custom import custom_task
from pipeline.tasks.hub import MIRROR_ENV
from pipeline.tasks.loading import (
    DATA_DIR_ENV,
    load_raw_split,
    load_task_splits,
    local_task_folder,
    resolve_data_dir,
)
from pipeline.tasks.registry import get_task, list_tasks
from pipeline.tasks.sampling import kshot_sample, mixture
from pipeline.tasks.splits import SPLIT_SEED, SPLITS
from pipeline.tasks.task import Task

__all__ = [
    "DATA_DIR_ENV",
    "MIRROR_ENV",
    "SPLITS",
    "SPLIT_SEED",
    "Task",
    "custom_task",
    "get_task",
    "kshot_sample",
    "list_tasks",
    "load_raw_split",
    "load_task_splits",
    "mixture",
    "local_task_folder",
    "resolve_data_dir",
]
