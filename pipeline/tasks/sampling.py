"""Drawing subsets of rendered rows: class-balanced k-shot samples and capped multi-task mixtures.

Both use `random.Random(seed)`, so a seed always gives the same rows on any machine and Python 3 version.
"""

from __future__ import annotations

import random

from pipeline.errors import PipelineError


def kshot_sample(rows: list[dict], k: int, seed: int, labels) -> list[dict]:
    """`k` rows, class-balanced: `k // n_classes` of each class in `labels` (matched on `row["target"]`).

    When `k` is not a multiple of the class count, the `k % n_classes` extra rows go one each to distinct
    classes picked at random by the seed (among classes that still have rows to spare), so class counts never
    differ by more than one. The result is shuffled; the same seed gives the same rows.
    """
    labels = list(dict.fromkeys(labels or ()))
    if len(labels) < 2:
        raise PipelineError("k-shot sampling needs a classification task with at least two labels")
    if isinstance(k, bool) or not isinstance(k, int) or k < len(labels):
        raise PipelineError(f"k={k!r} is smaller than the {len(labels)} classes: choose k >= {len(labels)}")
    by_class: dict[str, list[dict]] = {label: [] for label in labels}
    for row in rows:
        if row["target"] not in by_class:
            known = ", ".join(labels)
            raise PipelineError(f"row {row.get('id')!r} has target {row['target']!r}, not one of the labels {known}")
        by_class[row["target"]].append(row)
    per_class, extra = divmod(k, len(labels))
    for label, members in by_class.items():
        if len(members) < per_class:
            raise PipelineError(
                f"k={k} needs {per_class} rows of class {label!r}, but the data has only {len(members)}"
            )
    rng = random.Random(seed)
    spare = [label for label in labels if len(by_class[label]) > per_class]
    if len(spare) < extra:
        short = next(label for label in labels if label not in spare)
        raise PipelineError(
            f"k={k} needs {per_class + 1} rows of {extra} classes, but class {short!r} has only {len(by_class[short])}"
        )
    lucky = set(rng.sample(spare, extra))
    picked = [row for label in labels for row in rng.sample(by_class[label], per_class + (label in lucky))]
    rng.shuffle(picked)
    return picked


def mixture(rows_by_task: dict[str, list[dict]], cap: int, seed: int) -> list[dict]:
    """Examples-proportional multi-task mixture: each task gives all its rows, at most `cap` of them (a seeded
    random subset when it has more), and the union is shuffled. Each row is copied with a `"task"` key."""
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise PipelineError(f"mixture cap must be a positive number of rows, got {cap!r}")
    if not rows_by_task:
        raise PipelineError("a mixture needs at least one task")
    rng = random.Random(seed)
    mixed = []
    for name in sorted(rows_by_task):  # sorted: the result must not depend on dict insertion order
        rows = rows_by_task[name]
        if not rows:
            raise PipelineError(f"task {name!r} has no rows to mix: check its data")
        chosen = rng.sample(rows, cap) if len(rows) > cap else rows
        mixed.extend({**row, "task": name} for row in chosen)
    rng.shuffle(mixed)
    return mixed
