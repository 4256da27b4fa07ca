"""Drawing subsets of rendered rows: k-shot samples for every kind of target, and capped multi-task mixtures.

k-shot, by the task's kind (`kshot_sample(rows, k, seed, task)`):
- classification: class-balanced over the task's labels (`k // n` per class, the rest one each to distinct
  classes chosen by the seed); a task without a label set balances over the classes its rows have;
- regression: class-balanced over the task's score buckets (`Task.kshot_boundaries`; STS-B: score <= 2.5 and
  above, the authors' buckets); without boundaries, uniform;
- extractive QA: `k` rows drawn uniformly.
The authors' own sampler (train.py) walks a seeded shuffle and takes rows until each class is full; ours draws
the same class counts with `random.Random(seed)`, so a seed gives the same rows on any machine and Python 3.
"""

from __future__ import annotations

import bisect
import random

from pipeline.errors import PipelineError
from pipeline.tasks.task import Task


def _check_k(k, minimum: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < minimum:
        raise PipelineError(f"k={k!r} is smaller than the {minimum} {what}: choose k >= {minimum}")


def _balanced(rows: list[dict], k: int, seed: int, classes: list[str], key,
              what: tuple[str, str] = ("class", "classes")) -> list[dict]:
    """`k` rows with `k // len(classes)` of each class (`key(row)`), the extra rows to distinct random classes.
    `what` names a class in messages (singular, plural)."""
    one, many = what
    _check_k(k, len(classes), many)
    by_class: dict[str, list[dict]] = {name: [] for name in classes}
    for row in rows:
        name = key(row)
        if name not in by_class:
            raise PipelineError(f"row {row.get('id')!r} has target {row['target']!r}, not one of the labels "
                                f"{', '.join(classes)}")
        by_class[name].append(row)
    per_class, extra = divmod(k, len(classes))
    for name, members in by_class.items():
        if len(members) < per_class:
            raise PipelineError(f"k={k} needs {per_class} rows of {one} {name!r}, but the data has only {len(members)}")
    rng = random.Random(seed)
    spare = [name for name in classes if len(by_class[name]) > per_class]
    if len(spare) < extra:
        short = next(name for name in classes if name not in spare)
        raise PipelineError(
            f"k={k} needs {per_class + 1} rows of {extra} {many}, but {one} {short!r} has only "
            f"{len(by_class[short])}"
        )
    lucky = set(rng.sample(spare, extra))
    picked = [row for name in classes for row in rng.sample(by_class[name], per_class + (name in lucky))]
    rng.shuffle(picked)
    return picked


def _uniform(rows: list[dict], k: int, seed: int) -> list[dict]:
    _check_k(k, 1, "row")
    if k > len(rows):
        raise PipelineError(f"k={k} needs {k} training rows, but the data has only {len(rows)}")
    return random.Random(seed).sample(rows, k)


def _score_bucket(boundaries: tuple[float, ...]):
    def bucket(row: dict) -> str:
        try:
            score = float(row["target"])
        except ValueError:
            raise PipelineError(f"row {row.get('id')!r} has target {row['target']!r}, not a number") from None
        return str(bisect.bisect_left(boundaries, score))  # score <= boundaries[0] -> "0", and so on

    return bucket


def kshot_sample(rows: list[dict], k: int, seed: int, labels=None, task=None) -> list[dict]:
    """`k` training rows drawn with `seed`, shuffled; see the module docstring for each kind of task.

    Pass the `task` (any kind; also accepted in the place of `labels`); `labels` alone (a label sequence) is the
    older, classification-only form.
    """
    if isinstance(labels, Task):
        task, labels = labels, None
    if task is None:
        labels = list(dict.fromkeys(labels or ()))
        if len(labels) < 2:
            raise PipelineError("k-shot sampling over labels needs at least two labels; pass the task instead")
        return _balanced(rows, k, seed, labels, key=lambda row: row["target"])
    if task.kind == "qa":
        return _uniform(rows, k, seed)
    if task.kind == "regression":
        if not task.kshot_boundaries:
            return _uniform(rows, k, seed)
        buckets = [str(i) for i in range(len(task.kshot_boundaries) + 1)]
        return _balanced(rows, k, seed, buckets, key=_score_bucket(task.kshot_boundaries),
                         what=("score bucket", "score buckets"))
    labels = list(task.labels) if task.labels is not None else sorted({row["target"] for row in rows})
    if len(labels) < 2:
        raise PipelineError(f"k-shot sampling of task {task.name!r} needs rows of at least two classes")
    return _balanced(rows, k, seed, labels, key=lambda row: row["target"])


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
