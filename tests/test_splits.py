"""The paper's split rules on the shipped data, k-shot sampling and multi-task mixtures (no model)."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch
from conftest import SHIPPED_DATA as DATA_DIR
from conftest import missing_task_data, needs_full_data, needs_task_data, why_missing
from support import raises_one_line

from pipeline.tasks import get_task, kshot_sample, load_task_splits, mixture


# Small rule: train = train; the original validation set (n rows) -> validation floor(n/2), test the rest.
# RTE 277 -> 138/139, CB 56 -> 28/28, CoLA 1,043 -> 521/522, MRPC 408 -> 204/204, STS-B 1,500 -> 750/750.
@pytest.mark.parametrize(
    "name, sizes",
    [
        pytest.param(name, sizes, marks=needs_full_data(name))
        for name, sizes in [
            ("rte", (2490, 138, 139)),
            ("cb", (250, 28, 28)),
            ("cola", (8551, 521, 522)),
            ("mrpc", (3668, 204, 204)),
            ("stsb", (5749, 750, 750)),
        ]
    ],
)
def test_small_rule_sizes(name, sizes):
    splits = load_task_splits(name, DATA_DIR)
    assert (len(splits["train"]), len(splits["validation"]), len(splits["test"])) == sizes
    validation_ids = [row["id"] for row in splits["validation"]]
    test_ids = [row["id"] for row in splits["test"]]
    assert not set(validation_ids) & set(test_ids)
    assert len(set(validation_ids) | set(test_ids)) == sizes[1] + sizes[2]


@needs_full_data("qnli")
def test_large_rule_on_qnli():
    # Shipped QNLI train is a 9,999-row sample: 1,000 -> validation, 8,999 stay train; validation (5,463) -> test.
    splits = load_task_splits("qnli", DATA_DIR)
    assert {k: len(v) for k, v in splits.items()} == {"train": 8999, "validation": 1000, "test": 5463}
    assert not {r["id"] for r in splits["train"]} & {r["id"] for r in splits["validation"]}
    assert [r["id"] for r in splits["test"][:3]] == [0, 1, 2]  # the original validation order is kept


@needs_full_data("rte")
def test_split_is_the_authors_seed_42_permutation():
    splits = load_task_splits("rte", DATA_DIR, splits=("validation", "test"))
    generator = torch.Generator()
    generator.manual_seed(42)
    order = torch.randperm(277, generator=generator).tolist()
    assert [r["id"] for r in splits["validation"]] == order[:138]  # shipped RTE idx = hub row number
    assert [r["id"] for r in splits["test"]] == order[138:]
    # Pinned: a change to torch's CPU randperm would move the paper's test halves. The 10-element value is the
    # one other projects' tests pin for seed 42 as well.
    assert order[:3] == [207, 84, 253]
    generator.manual_seed(42)
    assert torch.randperm(10, generator=generator).tolist() == [2, 6, 1, 8, 4, 5, 0, 9, 3, 7]


@needs_task_data("cb")
def test_splits_ignore_global_random_state_and_follow_split_seed():
    random.seed(1)
    torch.manual_seed(1)
    first = load_task_splits("cb", DATA_DIR, splits=("test",))["test"]
    random.seed(2)
    torch.manual_seed(2)
    assert load_task_splits("cb", DATA_DIR, splits=("test",))["test"] == first
    other = load_task_splits("cb", DATA_DIR, split_seed=7, splits=("test",))["test"]
    assert [r["id"] for r in other] != [r["id"] for r in first]


@needs_full_data("mnli")
def test_mnli_train_and_test_work_without_validation_mismatched():
    splits = load_task_splits("mnli", DATA_DIR, splits=("train", "test"))
    assert {k: len(v) for k, v in splits.items()} == {"train": 9999, "test": 9815}
    message = raises_one_line("validation_mismatched", load_task_splits, "mnli", DATA_DIR)
    assert "takes validation from it" in message


def test_large_rule_needs_more_than_1000_training_rows(tmp_path):
    folder = tmp_path / "sst2"
    folder.mkdir()
    (folder / "train.jsonl").write_text(json.dumps({"sentence": "x", "label": 0, "idx": 0}) + "\n")
    raises_one_line("has 1 training rows", load_task_splits, "sst2", tmp_path, splits=("train",))


def test_unknown_split_name_is_refused():  # refused before any file is read
    raises_one_line("subset of train, validation, test", load_task_splits, "rte", DATA_DIR, splits=("dev",))


# k-shot ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cb_train():
    if missing_task_data("cb"):
        pytest.skip(why_missing(["cb"]))
    return load_task_splits("cb", DATA_DIR, splits=("train",))["train"]  # classes 0: 115, 1: 119, 2: 16


@needs_full_data("cb")  # 12-51 rows per class: more than the fixtures hold
def test_kshot_is_class_balanced(cb_train):
    labels = get_task("cb").labels
    assert Counter(r["target"] for r in kshot_sample(cb_train, 12, seed=1, labels=labels)) == {"0": 4, "1": 4, "2": 4}
    # 16 = 3 * 5 + 1: one class gets the extra row
    assert sorted(Counter(r["target"] for r in kshot_sample(cb_train, 16, seed=1, labels=labels)).values()) == [5, 5, 6]
    # 50 = 3 * 16 + 2: class "2" has exactly 16 rows, so the two extra rows go to the others
    assert Counter(r["target"] for r in kshot_sample(cb_train, 50, seed=3, labels=labels)) == {
        "0": 17,
        "1": 17,
        "2": 16,
    }


def test_kshot_is_deterministic_per_seed_and_differs_across_seeds(cb_train):
    labels = get_task("cb").labels

    def ids(seed: int) -> list:
        return [r["id"] for r in kshot_sample(cb_train, 16, seed=seed, labels=labels)]

    assert ids(0) == ids(0)
    assert len({tuple(ids(seed)) for seed in range(5)}) == 5
    assert len(set(ids(0))) == 16


@needs_full_data("cb")
def test_kshot_errors(cb_train):
    labels = get_task("cb").labels
    raises_one_line("needs 17 rows of class '2', but the data has only 16", kshot_sample, cb_train, 51, 0, labels)
    raises_one_line("k=2 is smaller than the 3 classes", kshot_sample, cb_train, 2, 0, labels)
    raises_one_line("at least two labels", kshot_sample, cb_train, 4, 0, None)


# Mixtures -------------------------------------------------------------------------------------------------


def rows_of(name: str, count: int) -> list[dict]:
    return [{"id": i, "source": f"{name} {i}", "target": "0"} for i in range(count)]


def test_mixture_is_examples_proportional_with_a_cap():
    data = {"small": rows_of("small", 10), "mid": rows_of("mid", 50), "big": rows_of("big", 200)}
    mixed = mixture(data, cap=40, seed=0)
    assert Counter(r["task"] for r in mixed) == {"small": 10, "mid": 40, "big": 40}
    assert all(r["source"].startswith(r["task"]) for r in mixed)
    assert len({(r["task"], r["id"]) for r in mixed}) == 90
    assert "task" not in data["small"][0]  # the inputs are not modified
    assert mixture(data, cap=40, seed=0) == mixed
    assert mixture(dict(reversed(list(data.items()))), cap=40, seed=0) == mixed
    assert mixture(data, cap=40, seed=1) != mixed
    uncapped = mixture(data, cap=1000, seed=0)
    assert Counter(r["task"] for r in uncapped) == {"small": 10, "mid": 50, "big": 200}


def test_mixture_errors():
    raises_one_line("task 'empty' has no rows", mixture, {"a": rows_of("a", 3), "empty": []}, 10, 0)
    raises_one_line("positive number of rows", mixture, {"a": rows_of("a", 3)}, 0, 0)
