"""k-shot sampling for every kind of target: classes, STS-B score buckets, extractive QA (no model)."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import SHIPPED_DATA, needs_full_data

from pipeline.errors import PipelineError
from pipeline.tasks import custom_task, get_task, kshot_sample, load_task_splits


def bucket(row: dict) -> str:
    """The authors' STS-B k-shot classes (train.py): "0" for score <= 2.5, else "1"."""
    return "0" if float(row["target"]) <= 2.5 else "1"


def score_rows(scores: list[float]) -> list[dict]:
    return [{"id": i, "source": f"pair {i}", "target": str(score)} for i, score in enumerate(scores)]


def test_stsb_kshot_is_balanced_over_the_authors_buckets():
    # 2.5 itself belongs to the low bucket; the high bucket is the rarer one here.
    rows = score_rows([0.0, 1.2, 2.5, 2.5, 0.4, 1.8, 3.0, 4.6, 2.6, 5.0] * 3)
    task = get_task("stsb")
    picked = kshot_sample(rows, 16, seed=0, task=task)
    assert len(picked) == 16 and len({r["id"] for r in picked}) == 16
    assert Counter(bucket(r) for r in picked) == {"0": 8, "1": 8}
    assert sorted(Counter(bucket(r) for r in kshot_sample(rows, 5, seed=0, task=task)).values()) == [2, 3]
    assert kshot_sample(rows, 16, seed=0, task=task) == picked
    assert kshot_sample(rows, 16, seed=1, task=task) != picked
    with pytest.raises(PipelineError, match="needs 13 rows of score bucket '1', but the data has only 12"):
        kshot_sample(rows, 26, seed=0, task=task)


@needs_full_data("stsb")
def test_stsb_kshot_on_the_shipped_training_set():
    train = load_task_splits("stsb", SHIPPED_DATA, splits=("train",))["train"]
    for k, seed in ((4, 0), (16, 1), (32, 2)):
        picked = kshot_sample(train, k, seed=seed, task=get_task("stsb"))
        assert Counter(bucket(r) for r in picked) == {"0": k // 2, "1": k // 2}


def test_qa_kshot_is_uniform_and_seeded():
    rows = [{"id": f"q{i}", "source": f"question: {i}", "target": "a", "answers": ["a"]} for i in range(40)]
    task = get_task("nq")
    picked = kshot_sample(rows, 16, seed=3, task=task)
    assert len({r["id"] for r in picked}) == 16 and kshot_sample(rows, 16, seed=3, task=task) == picked
    assert len({tuple(r["id"] for r in kshot_sample(rows, 4, seed=s, task=task)) for s in range(6)}) == 6
    with pytest.raises(PipelineError, match="k=41 needs 41 training rows, but the data has only 40"):
        kshot_sample(rows, 41, seed=0, task=task)
    with pytest.raises(PipelineError, match="k=0 is smaller than the 1 row"):
        kshot_sample(rows, 0, seed=0, task=task)


def test_classification_through_the_task_equals_the_label_form():
    rows = [{"id": i, "source": str(i), "target": str(i % 3)} for i in range(60)]
    task = get_task("mnli")
    assert kshot_sample(rows, 10, seed=5, task=task) == kshot_sample(rows, 10, seed=5, labels=task.labels)
    assert kshot_sample(rows, 10, 5, task) == kshot_sample(rows, 10, seed=5, task=task)  # the task in 4th place
    assert Counter(r["target"] for r in kshot_sample(rows, 12, seed=5, task=task)) == {"0": 4, "1": 4, "2": 4}


def test_custom_tasks_without_label_set_or_buckets():
    rows = [{"id": i, "source": str(i), "target": "pos" if i % 4 else "neg"} for i in range(40)]
    spec = {"name": "mine", "data_files": {"train": "t.csv"}, "input_columns": ["x"], "label_column": "y"}
    classes = custom_task({**spec, "metric": "accuracy"})  # no label_words: the rows' classes are balanced
    assert Counter(r["target"] for r in kshot_sample(rows, 8, seed=0, task=classes)) == {"neg": 4, "pos": 4}
    scores = score_rows([float(i) for i in range(30)])
    regression = custom_task({**spec, "metric": "pearson"})  # a score without buckets: drawn uniformly
    assert len({r["id"] for r in kshot_sample(scores, 8, seed=0, task=regression)}) == 8
    one_class = [{**row, "target": "pos"} for row in rows]
    with pytest.raises(PipelineError, match="needs rows of at least two classes"):
        kshot_sample(one_class, 4, seed=0, task=classes)
