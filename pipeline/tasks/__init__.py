"""Tasks: the registry of DePT's datasets, custom tasks, data loading, split rules and sampling."""

from pipeline.tasks.custom import custom_task
from pipeline.tasks.loading import DATA_DIR_ENV, load_raw_split, load_task_splits, resolve_data_dir
from pipeline.tasks.registry import get_task, list_tasks
from pipeline.tasks.sampling import kshot_sample, mixture
from pipeline.tasks.splits import SPLIT_SEED, SPLITS
from pipeline.tasks.task import Task

__all__ = [
    "DATA_DIR_ENV", "SPLITS", "SPLIT_SEED", "Task", "custom_task", "get_task", "kshot_sample", "list_tasks",
    "load_raw_split", "load_task_splits", "mixture", "resolve_data_dir",
]
