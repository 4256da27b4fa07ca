"""Custom tasks from a plain dict, as written in a YAML recipe or on the command line.

    {"name": "reviews", "data_files": {"train": "train.csv", "validation": "dev.csv"},
     "input_columns": ["title", "body"], "template": "review: {title} {body}",
     "label_column": "stars", "label_words": {"1": "0", "5": "1"}, "metric": "accuracy"}

The metric decides the kind: pearson/spearman -> regression, squad_em/squad_f1 -> extractive QA (the label
column holds the answer or a list of answers), anything else -> classification. Without `label_words` a
classification target is the raw label as text and no label set is enforced.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.metrics import METRIC_NAMES
from pipeline.tasks.registry import TASKS
from pipeline.tasks.targets import LabelWords, label_key, score_text
from pipeline.tasks.task import Task, template_fields

REQUIRED_KEYS = ("name", "data_files", "input_columns", "label_column", "metric")
OPTIONAL_KEYS = ("template", "label_words", "split_rule")
CUSTOM_SPLIT_RULES = ("small", "large", "original")  # "mnli" needs MNLI's own split names
DATA_SPLITS = ("train", "validation", "test")
DATA_SUFFIXES = (".jsonl", ".csv", ".parquet")


def _kind_for(metric: str) -> str:
    if metric in ("pearson", "spearman"):
        return "regression"
    return "qa" if metric.startswith("squad_") else "classification"


def _check_data_files(name: str, data_files: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(data_files, dict) or not data_files:
        raise PipelineError(f"custom task {name!r}: data_files must map splits ({', '.join(DATA_SPLITS)}) to files")
    for split, path in data_files.items():
        if split not in DATA_SPLITS:
            raise PipelineError(
                f"custom task {name!r}: data_files split {split!r} is not one of {', '.join(DATA_SPLITS)}"
            )
        if Path(str(path)).suffix not in DATA_SUFFIXES:
            raise PipelineError(f"custom task {name!r}: data file {path} must end in {', '.join(DATA_SUFFIXES)}")
    return tuple((split, str(path)) for split, path in data_files.items())


def _string_list(name: str, key: str, value: object) -> tuple[str, ...]:
    is_list = isinstance(value, (list, tuple)) and bool(value)
    if not is_list or not all(isinstance(item, str) for item in value):
        raise PipelineError(f"custom task {name!r}: {key} must be a non-empty list of column names")
    return tuple(value)


def custom_task(spec: dict) -> Task:
    """A `Task` from a spec dict; every problem raises `PipelineError` naming the offending key."""
    if not isinstance(spec, dict):
        raise PipelineError(f"a custom task spec must be a mapping, got {type(spec).__name__}")
    unknown = [key for key in spec if key not in REQUIRED_KEYS + OPTIONAL_KEYS]
    if unknown:
        allowed = ", ".join(REQUIRED_KEYS + OPTIONAL_KEYS)
        raise PipelineError(f"custom task spec has unknown key(s) {', '.join(map(str, unknown))}; allowed: {allowed}")
    missing = [key for key in REQUIRED_KEYS if key not in spec]
    if missing:
        raise PipelineError(f"custom task spec lacks {', '.join(missing)}; required: {', '.join(REQUIRED_KEYS)}")
    name = spec["name"]
    if not isinstance(name, str) or not name.strip():
        raise PipelineError("custom task name must be a non-empty string")
    if name in TASKS:
        raise PipelineError(f"custom task name {name!r} is a built-in task; choose another name")
    inputs = _string_list(name, "input_columns", spec["input_columns"])
    label_column = spec["label_column"]
    if not isinstance(label_column, str) or not label_column:
        raise PipelineError(f"custom task {name!r}: label_column must be a column name")
    metric = spec["metric"]
    if metric not in METRIC_NAMES:
        raise PipelineError(f"custom task {name!r}: metric {metric!r} is not one of {', '.join(METRIC_NAMES)}")
    split_rule = spec.get("split_rule", "small")
    if split_rule not in CUSTOM_SPLIT_RULES:
        rules = ", ".join(CUSTOM_SPLIT_RULES)
        raise PipelineError(f"custom task {name!r}: split_rule {split_rule!r} is not one of {rules}")
    template = spec.get("template")
    if template is not None:
        if not isinstance(template, str):
            raise PipelineError(f"custom task {name!r}: template must be a string like 'review: {{text}}'")
        stray = [field for field in template_fields(template) if field not in inputs]
        if stray:
            raise PipelineError(f"custom task {name!r}: template uses {', '.join(stray)}, not in input_columns")
    kind = _kind_for(metric)
    words = spec.get("label_words")
    if words is not None and (kind != "classification" or not isinstance(words, dict) or not words):
        raise PipelineError(
            f"custom task {name!r}: label_words must be a non-empty mapping, and only for classification metrics"
        )
    to_target = LabelWords.from_mapping(words) if words else score_text if kind == "regression" else label_key
    return Task(
        name=name,
        hub_path=None,
        hub_config=None,
        input_fields=inputs,
        label_column=label_column,
        labels=to_target.targets if words else None,
        metrics=(metric,),
        split_rule=split_rule,
        kind=kind,
        template=template,
        to_target=to_target,
        data_files=_check_data_files(name, spec["data_files"]),
    )
