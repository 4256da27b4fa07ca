"""Turning a raw label value from a data row into the target string the model learns to generate.

Every converter raises `PipelineError` for a value it cannot turn into a target, so a bad row is reported
instead of being trained on. Whether the target belongs to the task's label set is checked by `Task`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.errors import PipelineError


def label_key(value: object) -> str:
    """The text form of a raw label, equal for the same label read from JSON, CSV, parquet or YAML.

    JSON gives 1, CSV gives "1", parquet may give 1.0 and YAML mapping keys may be ints: all become "1".
    """
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def label_id(value: object) -> str:
    """Class-id labels (GLUE/SuperGLUE style 0, 1, 2): the target is the id as text."""
    if isinstance(value, bool) or value is None:
        raise PipelineError(f"label {value!r} is not a class id (expected 0, 1, ...)")
    key = label_key(value)
    if not key.lstrip("-").isdigit():
        raise PipelineError(f"label {value!r} is not a class id (expected 0, 1, ...)")
    return str(int(key))


def stsb_score(value: object) -> str:
    """STS-B similarity 0..5 rounded to one decimal, as text ("3.8", "5.0").

    `round(x * 10) / 10` is the same arithmetic as the authors' `np.round(x, 1)` (scale, round half to even,
    unscale), so targets match theirs digit for digit, e.g. 3.333 -> "3.3", 2.4667 -> "2.5".
    """
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PipelineError(f"STS-B label {value!r} is not a number") from None
    if not math.isfinite(score) or not 0.0 <= score <= 5.0:
        raise PipelineError(f"STS-B label {value!r} is outside the score range 0..5")
    return str(round(score * 10) / 10)


def score_text(value: object) -> str:
    """Regression labels of custom tasks: any finite number, as text ("3.7")."""
    try:
        score = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise PipelineError(f"label {value!r} is not a number") from None
    if not math.isfinite(score):
        raise PipelineError(f"label {value!r} is not a finite number")
    return str(score)


def winogrande_answer(value: object) -> str:
    """WinoGrande's `answer` is "1" or "2" (which option fills the blank); the target is "0" or "1"."""
    key = label_key(value)
    if key not in ("1", "2"):
        raise PipelineError(f"WinoGrande answer {value!r} is not '1' or '2' (unlabelled test rows cannot be used)")
    return str(int(key) - 1)


@dataclass(frozen=True)
class LabelWords:
    """A fixed mapping from raw label values to target strings (SciTail, custom tasks)."""

    pairs: tuple[tuple[str, str], ...]

    @classmethod
    def from_mapping(cls, mapping: dict) -> LabelWords:
        return cls(tuple((label_key(raw), str(target)) for raw, target in mapping.items()))

    def __call__(self, value: object) -> str:
        key = label_key(value)
        for raw, target in self.pairs:
            if raw == key:
                return target
        known = ", ".join(repr(raw) for raw, _ in self.pairs)
        raise PipelineError(f"label {value!r} is not one of the mapped labels {known}")

    @property
    def targets(self) -> tuple[str, ...]:
        """Distinct target strings in mapping order: the task's label set."""
        return tuple(dict.fromkeys(target for _, target in self.pairs))


def gold_answers(value: object) -> list[str]:
    """Extractive QA: every gold answer as a list (a single string counts as one answer)."""
    answers = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    if answers is None or not answers or not all(isinstance(a, str) for a in answers):
        raise PipelineError(f"answers {value!r} must be a non-empty list of strings")
    return answers
