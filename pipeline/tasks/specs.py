"""A task as a job names it: a registered name, a custom task mapping, or a custom task YAML/JSON file.

Relative `data_files` of a custom task file resolve against that file's folder, so a task file works from any
working directory (recipes make their inline mappings' paths absolute against the recipe file the same way).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.tasks.custom import custom_task
from pipeline.tasks.registry import get_task
from pipeline.tasks.task import Task

TASK_FILE_SUFFIXES = (".yaml", ".yml", ".json")


def with_absolute_paths(spec: dict, base_dir: Path) -> dict:
    """A custom task mapping whose relative data_files are resolved against `base_dir`."""
    files = spec.get("data_files")
    if not isinstance(files, dict):
        return spec
    resolved = {
        split: str(path if Path(str(path)).is_absolute() else (base_dir / str(path)).resolve())
        for split, path in files.items()
    }
    return {**spec, "data_files": resolved}


def read_task_file(path: str | Path) -> dict:
    """A custom task mapping from a YAML/JSON file, its data_files made absolute against the file's folder."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise PipelineError(
            f"custom task file {path} does not exist: pass a YAML file with name, data_files, "
            "input_columns, label_column, metric"
        )
    try:
        spec = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        raise PipelineError(f"custom task file {path} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(spec, dict):
        raise PipelineError(f"custom task file {path} must hold a mapping (name, data_files, input_columns, ...)")
    return with_absolute_paths(spec, file.resolve().parent)


def is_task_file(spec: object) -> bool:
    return isinstance(spec, str) and spec.endswith(TASK_FILE_SUFFIXES)


def task_from_spec(spec: str | dict) -> Task:
    if isinstance(spec, dict):
        return custom_task(spec)
    if is_task_file(spec):
        return custom_task(read_task_file(spec))
    return get_task(spec)
