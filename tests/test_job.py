"""One job's own rules (job.py) without training: the separator a mixture shares, the score a summary reports,
the data version each task was read at. Jobs that train: tests/test_train.py, tests/test_task_runs.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from support import raises_one_line

from pipeline.job import data_revisions, reported_score, separator_of


def task(name, separator=None, metrics=("accuracy",), hub_path=None, revision="main"):
    return SimpleNamespace(name=name, separator=separator, metrics=list(metrics), hub_path=hub_path, revision=revision)


def test_a_mixture_shares_one_separator():
    assert separator_of([task("a"), task("b")]) is None and separator_of([task("a", " => ")]) == " => "
    raises_one_line("render the text between source and target differently", separator_of, [task("a", "x"), task("b")])


def test_the_reported_score_is_the_tasks_first_metric_or_the_mixtures_mean():
    cb = task("cb", metrics=("accuracy", "f1_macro"))
    assert reported_score([cb], {"accuracy": 80.0, "f1_macro": 70.0, "score": 70.0}) == {
        "reported_metric": "accuracy",
        "test_score": 80.0,
    }
    assert reported_score([task("a"), task("b")], {"score": 55.0})["test_score"] == 55.0
    assert reported_score([cb], {}) == {"reported_metric": None, "test_score": None}


def test_hub_tasks_record_their_revision_or_the_local_folder(tmp_path):
    local = tmp_path / "rte"
    local.mkdir()
    (local / "train.jsonl").write_text("")
    revisions = data_revisions(
        [task("rte", hub_path="nyu-mll/glue"), task("cb", hub_path="aps/super_glue", revision="abc123"), task("syn")],
        str(tmp_path),
    )
    assert revisions == {"rte": f"local {local}", "cb": "abc123"}  # a local folder wins; generated tasks: none


@pytest.mark.parametrize("name", ["rte"])
def test_task_names_are_resolved_from_the_registry(name):
    from pipeline.config import DataArgs
    from pipeline.job import resolve_tasks

    assert [t.name for t in resolve_tasks(DataArgs(tasks=[name]))] == [name]
