"""The paper's split rules: which original split each of train/validation/test comes from, and how.

- small: train = train; the original validation set, shuffled, is halved: first half (floor) validation,
  the rest test (RTE: 277 -> 138 validation / 139 test).
- large: train, shuffled, gives its first 1,000 rows to validation and the rest to train; the original
  validation set is the test set.
- mnli: validation = validation_mismatched, test = validation_matched.
- original: the dataset's own train/validation/test (the authors' code does this for PAWS).

A task's `train_limit` then keeps the first N training rows (Yelp-2: the authors train on the first 100,000
rows left after holding out validation).

The shuffle is `torch.randperm` with a generator seeded 42 (independent of any training seed): the same
permutation the authors' code draws, so the validation/test halves are theirs, row for row, when the rows
come in hub order.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.errors import PipelineError

SPLITS = ("train", "validation", "test")
VALIDATION_FROM_TRAIN = 1000
SPLIT_SEED = 42


def seeded_permutation(size: int, seed: int) -> list[int]:
    """The authors' shuffle: a permutation of range(size) from a torch CPU generator seeded `seed`."""
    import torch  # imported here: `import pipeline.tasks` must stay torch-free (`dept run --dry_run`)

    generator = torch.Generator()
    generator.manual_seed(seed)
    return torch.randperm(size, generator=generator).tolist()


def original_split_of(task, split: str) -> str:
    """The original (hub/file) split that `split` is drawn from under the task's rule."""
    if split not in SPLITS:
        raise PipelineError(f"split {split!r} is not one of {', '.join(SPLITS)}")
    rule = task.split_rule
    if rule == "mnli":
        return {"train": "train", "validation": "validation_mismatched", "test": "validation_matched"}[split]
    if rule == "small":
        return "train" if split == "train" else task.eval_split
    if rule == "large":
        return task.eval_split if split == "test" else "train"
    return split


def _halves(rows: list, seed: int) -> tuple[list, list]:
    order = seeded_permutation(len(rows), seed)
    half = len(rows) // 2
    return [rows[i] for i in order[:half]], [rows[i] for i in order[half:]]


def _hold_out(task, rows: list, seed: int) -> tuple[list, list]:
    if len(rows) <= VALIDATION_FROM_TRAIN:
        raise PipelineError(
            f"task {task.name!r} has {len(rows)} training rows; the large split rule moves {VALIDATION_FROM_TRAIN} "
            "of them to validation and needs more: use split_rule 'small'"
        )
    order = seeded_permutation(len(rows), seed)
    return [rows[i] for i in order[VALIDATION_FROM_TRAIN:]], [rows[i] for i in order[:VALIDATION_FROM_TRAIN]]


def apply_split_rule(task, wanted: tuple[str, ...], fetch: Callable[[str], list], seed: int = SPLIT_SEED) -> dict:
    """`{split: rows}` for each wanted split; `fetch(original_split)` supplies rows and is called only for the
    original splits the wanted ones need (so MNLI train+test works without validation_mismatched)."""
    result = {}
    for split in wanted:
        source = original_split_of(task, split)
        rows = fetch(source)
        if task.split_rule == "small" and split != "train":
            rows = _halves(rows, seed)[split == "test"]
        elif task.split_rule == "large" and split != "test":
            rows = _hold_out(task, rows, seed)[split == "validation"]
        if split == "train" and task.train_limit is not None:
            rows = rows[: task.train_limit]
        if not rows:
            raise PipelineError(
                f"split {split!r} of task {task.name!r} is empty after the {task.split_rule!r} rule "
                f"(original split {source!r}): it needs more rows"
            )
        result[split] = rows
    return result
