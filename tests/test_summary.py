"""A recipe's summary (summary.py): the table of mean +- std over seeds per target, k and start, and the aggregates
MLflow stores as the parent run's metrics."""

from __future__ import annotations

from support import job_results

from pipeline.summary import aggregates, summarize


def test_summary_table_and_aggregates(jobs):
    summary = summarize("small", jobs, job_results(jobs))
    cell = next(r for r in summary["transfer"] if (r["stage"], r["k"], r["start"]) == ("transfer", 4, "source"))
    assert cell["scores"] == [69.0, 74.0] and cell["mean"] == 71.5 and cell["std"] == 3.54 and cell["n"] == 2
    warmup = next(s for s in summary["sources"] if s["stage"] == "warmup")
    assert warmup["test"]["syn-warm-animal.accuracy"] == 62.5  # rounded: not 62.50000000000001
    assert "| syn-target-food | source adapter | 71.5 +- 3.5 (n=2) | 75.5 +- 3.5 (n=2) |" in summary["markdown"]
    assert ".n " not in summary["markdown"] and "invalid" not in summary["markdown"]
    metrics = aggregates(summary)
    # two transfer stages share a target: the stage keeps their cells apart
    assert metrics["transfer.syn-target-food.k4.source.mean"] == 71.5
    assert metrics["transfer.syn-target-food.k4.source.std"] == 3.54
    assert metrics["wide.syn-target-vehicle.k4.source.mean"] == 69.0
    assert metrics["warmup.test_syn-warm-animal.accuracy"] == 62.5
    assert not any(k.endswith((".n", ".invalid", ".score")) for k in metrics)
    assert not any("/" in k for k in metrics)
    one_stage = [j for j in jobs if j.stage != "wide"]
    plain = aggregates(summarize("small", one_stage, job_results(one_stage)))
    assert plain["syn-target-food.k8.scratch.mean"] == 65.5 and "transfer.syn-target-food.k8.scratch.mean" not in plain


def test_aggregate_names_never_hold_a_slash():
    summary = {
        "sources": [{"stage": "s", "test": {"org/task.accuracy": 50.0}}],
        "transfer": [{"stage": "t", "target": "org/task", "k": 4, "start": "source", "mean": 50.0, "std": 0.0, "n": 1}],
    }
    assert set(aggregates(summary)) == {"org_task.k4.source.mean", "org_task.k4.source.std", "s.test_org_task.accuracy"}
