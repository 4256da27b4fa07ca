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

Rows are a list of dicts or a `datasets.Dataset` (`tables.py`); a table's parts are index mappings over its file
(`Dataset.select` with the same permutation indices), so both give the same rows in the same order.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.errors import PipelineError
from pipeline.tasks.tables import head, take

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


def _halves(rows, seed: int, second: bool):
    """The first (floor) or the second half of the seeded shuffle."""
    order = seeded_permutation(len(rows), seed)
    half = len(rows) // 2
    return take(rows, order[half:] if second else order[:half])


def _hold_out(task, rows, seed: int, held: bool):
    """The rows left for training, or (`held`) the first 1,000 of the seeded shuffle."""
    if len(rows) <= VALIDATION_FROM_TRAIN:
        raise PipelineError(
            f"task {task.name!r} has {len(rows)} training rows; the large split rule moves {VALIDATION_FROM_TRAIN} "
            "of them to validation and needs more: use split_rule 'small'"
        )
    order = seeded_permutation(len(rows), seed)
    return take(rows, order[:VALIDATION_FROM_TRAIN] if held else order[VALIDATION_FROM_TRAIN:])


def apply_split_rule(task, wanted: tuple[str, ...], fetch: Callable[[str], object], seed: int = SPLIT_SEED) -> dict:
    """`{split: rows}` for each wanted split; `fetch(original_split)` supplies rows (a list or a table) and is called
    only for the original splits the wanted ones need (so MNLI train+test works without validation_mismatched)."""
    result = {}
    for split in wanted:
        source = original_split_of(task, split)
        rows = fetch(source)
        if task.split_rule == "small" and split != "train":
            rows = _halves(rows, seed, second=split == "test")
        elif task.split_rule == "large" and split != "test":
            rows = _hold_out(task, rows, seed, held=split == "validation")
        if split == "train" and task.train_limit is not None:
            rows = head(rows, task.train_limit)
        if not len(rows):
            raise PipelineError(
                f"split {split!r} of task {task.name!r} is empty after the {task.split_rule!r} rule "
                f"(original split {source!r}): it needs more rows"
            )
        result[split] = rows
    return result
