"""Drawing subsets of rendered rows: k-shot samples for every kind of target, and capped multi-task mixtures.

k-shot, by the task's kind (`kshot_sample(rows, k, seed, task)`):
- classification: class-balanced over the task's labels (`k // n` per class, the rest one each to distinct
  classes chosen by the seed); a task without a label set balances over the classes its rows have;
- regression: class-balanced over the task's score buckets (`Task.kshot_boundaries`; STS-B: score <= 2.5 and
  above, the authors' buckets); without boundaries, uniform;
- extractive QA: `k` rows drawn uniformly.
The authors' own sampler (train.py) walks a seeded shuffle and takes rows until each class is full; ours draws
the same class counts with `random.Random(seed)`, so a seed gives the same rows on any machine and Python 3.

Rows are a list of dicts or a memory-mapped `datasets.Dataset` (`tables.py`). Both are sampled by position: the
draws see only the `target` column and the number of rows, so a list and a table of the same rows give the same
rows for a seed. A table's sample is an index mapping over its file (`Dataset.select`); a table mixture is written
once, in mixture order, to a content-keyed Arrow file under the cache (`mixture`).
"""

from __future__ import annotations

import bisect
import random

from pipeline.errors import PipelineError
from pipeline.tasks import tables
from pipeline.tasks.task import Task


def _check_k(k, minimum: int, what: str) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < minimum:
        raise PipelineError(f"k={k!r} is smaller than the {minimum} {what}: choose k >= {minimum}")


def _balanced(
    rows, targets: list[str], k: int, seed: int, classes: list[str], key, what: tuple[str, str] = ("class", "classes")
) -> list[int]:
    """Positions of `k` rows with `k // len(classes)` of each class (`key(target, position)`), the extra rows to
    distinct random classes. `what` names a class in messages (singular, plural)."""
    one, many = what
    _check_k(k, len(classes), many)
    by_class: dict[str, list[int]] = {name: [] for name in classes}
    for position, target in enumerate(targets):
        name = key(target, position)
        if name not in by_class:
            raise PipelineError(
                f"row {_id_at(rows, position)!r} has target {target!r}, not one of the labels {', '.join(classes)}"
            )
        by_class[name].append(position)
    per_class, extra = divmod(k, len(classes))
    for name, members in by_class.items():
        if len(members) < per_class:
            raise PipelineError(f"k={k} needs {per_class} rows of {one} {name!r}, but the data has only {len(members)}")
    rng = random.Random(seed)
    spare = [name for name in classes if len(by_class[name]) > per_class]
    if len(spare) < extra:
        short = next(name for name in classes if name not in spare)
        raise PipelineError(
            f"k={k} needs {per_class + 1} rows of {extra} {many}, but {one} {short!r} has only {len(by_class[short])}"
        )
    lucky = set(rng.sample(spare, extra))
    picked = [i for name in classes for i in rng.sample(by_class[name], per_class + (name in lucky))]
    rng.shuffle(picked)
    return picked


def _id_at(rows, position: int):
    row = rows[position]
    return row.get("id") if isinstance(row, dict) else None


def _uniform(n: int, k: int, seed: int) -> list[int]:
    _check_k(k, 1, "row")
    if k > n:
        raise PipelineError(f"k={k} needs {k} training rows, but the data has only {n}")
    return random.Random(seed).sample(range(n), k)


def _score_bucket(rows, boundaries: tuple[float, ...]):
    def bucket(target: str, position: int) -> str:
        try:
            score = float(target)
        except ValueError:
            raise PipelineError(f"row {_id_at(rows, position)!r} has target {target!r}, not a number") from None
        return str(bisect.bisect_left(boundaries, score))  # score <= boundaries[0] -> "0", and so on

    return bucket


def _by_target(target: str, position: int) -> str:
    return target


def kshot_positions(rows, k: int, seed: int, labels=None, task=None) -> list[int]:
    """The positions `kshot_sample` takes, in its order (reads only the `target` column of a table)."""
    if isinstance(labels, Task):
        task, labels = labels, None
    if task is None:
        labels = list(dict.fromkeys(labels or ()))
        if len(labels) < 2:
            raise PipelineError("k-shot sampling over labels needs at least two labels; pass the task instead")
        return _balanced(rows, tables.column(rows, "target"), k, seed, labels, key=_by_target)
    if task.kind == "qa":
        return _uniform(len(rows), k, seed)
    if task.kind == "regression":
        if not task.kshot_boundaries:
            return _uniform(len(rows), k, seed)
        buckets = [str(i) for i in range(len(task.kshot_boundaries) + 1)]
        return _balanced(
            rows,
            tables.column(rows, "target"),
            k,
            seed,
            buckets,
            key=_score_bucket(rows, task.kshot_boundaries),
            what=("score bucket", "score buckets"),
        )
    targets = tables.column(rows, "target")
    labels = list(task.labels) if task.labels is not None else sorted(set(targets))
    if len(labels) < 2:
        raise PipelineError(f"k-shot sampling of task {task.name!r} needs rows of at least two classes")
    return _balanced(rows, targets, k, seed, labels, key=_by_target)


def kshot_sample(rows, k: int, seed: int, labels=None, task=None):
    """`k` training rows drawn with `seed`, shuffled; see the module docstring for each kind of task. A list gives
    a list; a `datasets.Dataset` gives a `Dataset` (an index mapping over the same file).

    Pass the `task` (any kind; also accepted in the place of `labels`); `labels` alone (a label sequence) is the
    older, classification-only form.
    """
    return tables.take(rows, kshot_positions(rows, k, seed, labels, task))


def mixture_positions(sizes: dict[str, int], cap: int, seed: int) -> list[tuple[str, int]]:
    """(task, position) of every mixed row, in mixture order: each task gives all its rows, at most `cap` of them (a
    seeded random subset when it has more), and the union is shuffled."""
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise PipelineError(f"mixture cap must be a positive number of rows, got {cap!r}")
    if not sizes:
        raise PipelineError("a mixture needs at least one task")
    rng = random.Random(seed)
    mixed: list[tuple[str, int]] = []
    for name in sorted(sizes):  # sorted: the result must not depend on dict insertion order
        if not sizes[name]:
            raise PipelineError(f"task {name!r} has no rows to mix: check its data")
        chosen = rng.sample(range(sizes[name]), cap) if sizes[name] > cap else range(sizes[name])
        mixed.extend((name, i) for i in chosen)
    rng.shuffle(mixed)
    return mixed


def mixture(rows_by_task: dict, cap: int, seed: int):
    """Examples-proportional multi-task mixture: each task gives all its rows, at most `cap` of them (a seeded
    random subset when it has more), and the union is shuffled. Each row is copied with a `"task"` key.

    Lists give a list. When any task's rows are a `datasets.Dataset`, the mixture is a memory-mapped `Dataset`
    written once (per content key) to the cache, in mixture order, with a `task` column."""
    positions = mixture_positions({name: len(rows) for name, rows in rows_by_task.items()}, cap, seed)
    if not any(tables.is_table(rows) for rows in rows_by_task.values()):
        return [{**rows_by_task[name][i], "task": name} for name, i in positions]
    return _mixture_table(rows_by_task, positions, cap, seed)


def _mixture_table(rows_by_task: dict, positions: list[tuple[str, int]], cap: int, seed: int):
    names = sorted(rows_by_task)
    columns = list(dict.fromkeys([c for name in names for c in _column_names(rows_by_task[name])] + ["task"]))
    if "task" in columns[:-1]:
        raise PipelineError("rows to mix already have a 'task' column: rename it")
    key = tables.digest(
        "mixture",
        tables.TABLE_VERSION,
        cap,
        seed,
        [(name, tables.fingerprint_of(rows_by_task[name]), len(rows_by_task[name])) for name in names],
    )
    path = tables.cache_dir("mixtures") / f"mixture-{key}.arrow"

    def build(target) -> None:
        import pyarrow as pa

        types = {"source": pa.string(), "target": pa.string(), "task": pa.string()}
        if "answers" in columns:
            types["answers"] = pa.list_(pa.string())
        with tables.RowWriter(target, key, columns, types) as writer:
            for start in range(0, len(positions), tables.BATCH_ROWS):
                for row in _rows_of(rows_by_task, positions[start : start + tables.BATCH_ROWS]):
                    writer.add(row)
            writer.commit()

    tables.build_once(path, build)
    return tables.open_table(path)


def _column_names(rows) -> list[str]:
    if tables.is_table(rows):
        return list(rows.column_names)
    return list(dict.fromkeys(name for row in rows for name in row))


def _rows_of(rows_by_task: dict, part: list[tuple[str, int]]) -> list[dict]:
    """The rows at (task, position) pairs, each with its `task`, in order; a table is read once per task."""
    wanted: dict[str, list[int]] = {}
    for name, i in part:
        wanted.setdefault(name, []).append(i)
    fetched = {}
    for name, indices in wanted.items():
        rows = rows_by_task[name]
        if tables.is_table(rows):
            batch = rows[indices]
            fetched[name] = iter([dict(zip(batch, values)) for values in zip(*batch.values())])
        else:
            fetched[name] = iter([rows[i] for i in indices])
    return [{**next(fetched[name]), "task": name} for name, _ in part]
