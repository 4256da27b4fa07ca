"""A 2 x 2 sweep on stories260K end to end (#19): four trial jobs, the best chosen on validation, a transfer stage
starting from the best trial's adapter (its init adapter and its MLflow lineage), an interrupted trial resumed, and
a re-run reusing every trial. Tiny steps: mechanics, not learning (the shipped recipes/sweep_quickstart.yaml is
where the sweep finds learning rates that learn)."""

from __future__ import annotations

import json

import optuna
import pytest
import yaml
from conftest import run

from pipeline import sweep

pytestmark = pytest.mark.slow

RECIPE = {
    "name": "sweep-test",
    "model": "stories260K",
    "ds_config": "zero3_cpu",
    "method": "dept",
    "dept": {"num_virtual_tokens": 4, "r": 1, "max_length": 96, "prompt_init": "TEXT", "init_text": "story: Label :"},
    "train": {"batch_size": 8, "steps": 12, "warmup_steps": 1, "eval_every": 6, "save_every": 6, "log_every": 6},
    # label scoring: validation scores that differ between trials after a few steps
    "data": {"eval_mode": "score", "max_eval_rows": 16},
    "stages": [
        {
            "name": "source",
            "tasks": ["stories-animal"],
            "sweep": {"train.lr_prompt": [0.03, 1.0], "train.lr_lowrank": [1e-4, 1e-2], "prune": "median"},
        },
        {
            "name": "transfer",
            "type": "transfer",
            "source": "source",
            "targets": ["stories-had"],
            "k": [8],
            "seeds": [1],
            "train": {"steps": 4, "eval_every": 0, "save_every": 0},
        },
    ],
}


def test_a_2x2_sweep_picks_the_best_on_validation_hands_it_to_transfer_resumes_and_reuses(tmp_path):
    out, db = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump({**RECIPE, "output_dir": str(out), "tracking": {"uri": db, "experiment": "sw"}}, sort_keys=False)
    )

    killed = run(["run", str(path)], env={"DEPT_FAULT_KILL_AT_STEP": "6"}, check=False)
    assert killed.returncode != 0
    first = out / "source" / "stories-animal" / "lr_prompt=0.03,lr_lowrank=0.0001"
    assert (first / "checkpoints" / "latest").exists() and not (first / "results.json").exists()

    proc = run(["run", str(path)])
    assert "[1/5] source lr_prompt=0.03,lr_lowrank=0.0001 stories-animal: resumed" in proc.stdout
    assert "resumed from step 6" in proc.stdout + proc.stderr
    trials = sorted((out / "source" / "stories-animal").iterdir())
    assert len(trials) == 4
    results = {t.name: json.loads((t / "results.json").read_text()) for t in trials}
    # median pruning: the first two trials run to the end; a later one whose step-6 validation is below theirs stops
    pruned = {name for name, r in results.items() if r["stopped_early"]}
    for name, r in results.items():
        assert [e["step"] for e in r["evals"]] == ([6] if name in pruned else [6, 12])
        assert r["stopped_early"] is None or r["stopped_early"]["step"] == 6
    assert results[first.name]["evals"][0]["step"] == 6  # the resumed trial kept the validation before the kill
    order = [
        "lr_prompt=0.03,lr_lowrank=0.0001",
        "lr_prompt=0.03,lr_lowrank=0.01",
        "lr_prompt=1,lr_lowrank=0.0001",
        "lr_prompt=1,lr_lowrank=0.01",
    ]
    assert not pruned & set(order[:2])
    scores = [results[name]["best_validation"] for name in order]
    candidates = [s if name not in pruned else float("-inf") for name, s in zip(order, scores)]
    winner = order[candidates.index(max(candidates))]  # the first of the best unpruned, as the plan orders them
    best = json.loads((out / "source" / "best.json").read_text())
    assert best["setting"] == winner and best["best_validation"] == max(candidates)
    assert best["test_score"] == results[winner]["test_score"]
    assert f"source: best trial {winner} (validation {max(candidates):.1f}" in proc.stdout
    for name in pruned:
        assert f"{name} stories-animal: pruned at step 6" in proc.stdout

    # the transfer stage starts from the winner's best adapter
    job_dir = out / "transfer" / "stories-had" / "k8" / "seed1" / "source"
    transfer = json.loads((job_dir / "results.json").read_text())
    assert transfer["config"]["init_adapter"] == str(out / "source" / "best_adapter")
    winner_adapter = out / "source" / "stories-animal" / winner / "best_adapter"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / "source" / "best_adapter" / name).read_bytes() == (winner_adapter / name).read_bytes()

    summary = json.loads((out / "summary.json").read_text())
    (table,) = summary["sweeps"]
    assert table["winner"] == f"source/stories-animal/{winner}"
    assert [r["best_validation"] for r in table["trials"]] == [round(s, 2) for s in scores]
    assert {r["setting"] for r in table["trials"] if r["pruned_at"] == 6} == pruned
    assert [s["key"] for s in summary["sources"]] == [table["winner"]]
    assert (out / "sweep.png").stat().st_size > 10_000

    # MLflow: a run per trial with its swept values and validation score; the transfer run's lineage names the winner
    from mlflow.tracking import MlflowClient

    client = MlflowClient(db)
    runs = client.search_runs([client.get_experiment_by_name("sw").experiment_id], max_results=100)
    by_job = {r.data.tags.get("dept.job"): r for r in runs if "dept.job" in r.data.tags}
    winner_run = by_job[table["winner"]]
    assert winner_run.data.params["sweep.train.lr_prompt"] == str(results[winner]["config"]["train"]["lr_prompt"])
    assert winner_run.data.metrics["sweep.val_score"] == pytest.approx(max(candidates), abs=1e-3)
    lineage = by_job["transfer/stories-had/k8/seed1/source"].data.tags
    assert lineage["dept.source_trial"] == table["winner"]
    assert lineage["dept.source_run_id"] == winner_run.info.run_id
    parent = next(r for r in runs if "dept.job" not in r.data.tags)
    assert parent.data.tags["dept.sweep.source.winner"] == table["winner"]
    assert "sweep.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}

    # the study holds the four trials, finished with their validation scores
    study = optuna.load_study(
        study_name="dept.sweep-test.source",
        storage=sweep.storage_of(sweep.parse(RECIPE["stages"][0]["sweep"], "dept", "s"), out / "source"),
    )
    states = {t.user_attrs["dept.job"].rsplit("/", 1)[-1]: t.state for t in study.trials}
    done, cut = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    assert states == {name: cut if name in pruned else done for name in order}
    values = {t.user_attrs["dept.job"].rsplit("/", 1)[-1]: t.value for t in study.trials if t.state == done}
    assert values == {name: pytest.approx(results[name]["best_validation"]) for name in order if name not in pruned}
    assert all(t.intermediate_values.get(6) is not None for t in study.trials)  # each validation was reported

    again = run(["run", str(path)])
    assert again.stdout.count("reused") >= 5 and "started" not in again.stdout
    assert json.loads((out / "summary.json").read_text())["run"]["reused"] == 5
    assert len(optuna.load_study(study_name="dept.sweep-test.source", storage=study._storage).trials) == 4
