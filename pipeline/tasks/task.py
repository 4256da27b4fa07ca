"""`Task`: everything the pipeline knows about one dataset, and how a data row becomes source/target text.

Source text is `"field1: text1 field2: text2 ..."` (no task prefix, single spaces, field text verbatim), the
authors' T5 text-to-text format; the target is the label id as text ("0", "1", "2"), the STS-B score rounded
to 0.1, or the first gold answer for extractive QA.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.errors import PipelineError
from pipeline.tasks.targets import gold_answers, label_id

SPLIT_RULES = ("small", "large", "mnli", "original")
KINDS = ("classification", "regression", "qa")
ID_COLUMNS = ("idx", "id", "qid")  # the first present one identifies a row; otherwise its row number
UNPINNED = "main"  # a hub revision that follows the branch head: recorded as unpinned
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class Task:
    """One task. Built-in tasks live in `registry.py`; `custom_task` builds one from a recipe dict.

    `split_rule` picks how train/validation/test are formed (`splits.py`): "small", "large", "mnli" (the paper's
    three) or "original" (the dataset's own three splits, as the authors' code does for PAWS).
    """

    name: str
    hub_path: str | None
    hub_config: str | None
    input_fields: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]  # reported, in this order; the first is the task's headline metric
    split_rule: str
    kind: str
    # Words written before each input field in the source; empty means the column names themselves
    # (the authors write Yelp's `text` column as "sentence:").
    field_names: tuple[str, ...] = ()
    template: str | None = None  # str.format template over the row's columns; replaces the field joining
    to_target: Callable[[object], str] = label_id
    row_transform: Callable[[dict], dict] | None = None  # row -> row before rendering (WSC marks, MultiRC markup)
    extra_columns: tuple[str, ...] = ()  # columns `row_transform` reads besides the input fields
    row_filter: tuple[str, str] | None = None  # (column, value): keep only those rows (MRQA subsets)
    eval_split: str = "validation"  # the original split the split rules treat as "the validation set"
    split_aliases: tuple[tuple[str, str], ...] = ()  # (split, other local file stem holding it)
    data_files: tuple[tuple[str, str], ...] = ()  # custom tasks: (split, path)
    # Hub revision (commit sha, or UNPINNED); recorded with results so a run names the data it used.
    revision: str | None = None
    # Metric that picks the best checkpoint on validation (None: the headline metric, metrics[0]).
    selection_metric: str | None = None
    train_limit: int | None = None  # keep only the first N training rows after the split rule (Yelp: 100,000)
    # Rows that cannot be rendered are skipped with a warning while they are under this fraction of a split;
    # at or above it the split is refused. 0 refuses any bad row.
    bad_row_tolerance: float = 0.01
    # k-shot buckets for regression targets: score <= boundary[0] is bucket 0, and so on (STS-B: 2.5).
    kshot_boundaries: tuple[float, ...] = ()
    # Generated tasks (quickstart): original split name -> rendered rows {id, source, target}; no data files.
    generate: Callable[[str], list[dict]] | None = None
    # Decoder-only models: the text between source and target (None: the authors' " Label : ", data.py).
    separator: str | None = None

    def __post_init__(self):
        if self.split_rule not in SPLIT_RULES:
            rules = ", ".join(SPLIT_RULES)
            raise PipelineError(f"task {self.name!r}: split_rule {self.split_rule!r} is not one of {rules}")
        if self.kind not in KINDS:
            raise PipelineError(f"task {self.name!r}: kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.field_names and len(self.field_names) != len(self.input_fields):
            raise PipelineError(f"task {self.name!r}: field_names must name each of {self.input_fields}")
        if not self.metrics:
            raise PipelineError(f"task {self.name!r} needs at least one metric")
        if self.selection_metric is None:
            object.__setattr__(self, "selection_metric", self.metrics[0])  # frozen: set the default once
        elif self.selection_metric not in self.metrics:
            raise PipelineError(
                f"task {self.name!r}: selection_metric {self.selection_metric!r} must be one of its metrics "
                f"{', '.join(self.metrics)}"
            )
        if not 0.0 <= self.bad_row_tolerance < 1.0:
            raise PipelineError(f"task {self.name!r}: bad_row_tolerance must be a fraction in [0, 1)")

    @property
    def revision_pinned(self) -> bool:
        """True when `revision` names one immutable hub commit."""
        return bool(self.revision and _COMMIT_SHA.fullmatch(self.revision))

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Columns every row must have (template fields are a subset of the input fields)."""
        return tuple(dict.fromkeys(self.input_fields + self.extra_columns + (self.label_column,)))

    def data_file(self, split: str) -> str:
        """Custom tasks: the file holding `split`."""
        files = dict(self.data_files)
        if split not in files:
            raise PipelineError(
                f"custom task {self.name!r} has no data file for split {split!r} (has: {', '.join(files) or 'none'}); "
                f"add data_files.{split} to the task spec"
            )
        return files[split]

    def source(self, row: dict) -> str:
        """The model input text for one (transformed) row."""
        for column in self.input_fields:
            if row[column] is None:
                raise PipelineError(f"column {column!r} is empty (null)")
        if self.template is not None:
            return self.template.format_map(row)
        names = self.field_names or self.input_fields
        return " ".join(f"{name}: {row[column]}" for name, column in zip(names, self.input_fields))

    def target(self, raw_label: object) -> str:
        """The target text for a raw label value, checked against the label set."""
        target = self.to_target(raw_label)
        if self.labels is not None and target not in self.labels:
            raise PipelineError(
                f"label {raw_label!r} (target {target!r}) is not in the label set {', '.join(self.labels)} "
                f"of task {self.name!r}"
            )
        return target

    def render(self, row: dict) -> dict:
        """`{"source", "target"}` for one data row, plus `"answers"` (all gold answers) for QA tasks."""
        missing = [column for column in self.required_columns if column not in row]
        if missing:
            raise PipelineError(
                f"row lacks column(s) {', '.join(missing)} needed by task {self.name!r} (it has: {', '.join(row)}); "
                "rename the data's columns or fix the task's input columns"
            )
        if self.row_transform is not None:
            row = self.row_transform(row)
        if self.kind == "qa":
            answers = gold_answers(row[self.label_column])
            return {"source": self.source(row), "target": answers[0], "answers": answers}
        return {"source": self.source(row), "target": self.target(row[self.label_column])}


def template_fields(template: str) -> list[str]:
    """Column names a str.format template refers to; positional `{}` fields are refused."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise PipelineError(f"template {template!r} is not a valid str.format template ({err})") from None
    if any(not name or name.isdigit() for name in fields):
        raise PipelineError(f"template {template!r} must name its columns, e.g. 'review: {{text}}', not use '{{}}'")
    return [name.split(".")[0].split("[")[0] for name in fields]


def row_id(row: dict, number: int) -> object:
    """A row's id: its idx/id/qid column (MultiRC's nested idx joined as "p-q-a"), else its row number."""
    for column in ID_COLUMNS:
        value = row.get(column)
        if value is not None:
            return "-".join(str(part) for part in value.values()) if isinstance(value, dict) else value
    return number
