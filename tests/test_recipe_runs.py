"""Recipes end to end: the real-data few-shot recipe, and a recipe killed mid-transfer on 2 ranks and re-run (the
quickstart itself runs in tests/test_readme.py; MLflow's view of a recipe in tests/test_mlflow_ui.py)."""

from __future__ import annotations

import json

import pytest
from conftest import needs_task_data, run

pytestmark = pytest.mark.slow

# A shortened quickstart: both source stages, one transfer cell each, checkpoints every 5 steps.
SHORT = [
    "--stages.source.train.steps=40",
    "--stages.source-pt.train.steps=40",
    "--train.warmup_steps=4",
    "--stages.transfer.k=[8]",
    "--stages.transfer.seeds=[1]",
    "--stages.transfer.targets=[stories-had]",
    "--stages.transfer.control=false",
    "--stages.transfer.train.steps=20",
    "--stages.transfer.train.save_every=5",
    "--stages.transfer-pt.k=[8]",
    "--stages.transfer-pt.seeds=[1]",
    "--stages.transfer-pt.targets=[stories-had]",
    "--stages.transfer-pt.train.steps=20",
    "--data.max_eval_rows=20",
]


def mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)


@needs_task_data("mnli", "qnli", "rte", "cb")
def test_fewshot_small_on_real_data(tmp_path):
    out = tmp_path / "fs"
    proc = run(
        [
            "run",
            "fewshot_small",
            f"--output_dir={out}",
            "--stages.transfer.k=[4,16]",
            "--stages.transfer.seeds=[1,2]",
            "--stages.transfer.targets=[rte,cb]",
            "--tracking.enabled=false",
        ],
        timeout=1500,
    )
    assert "| target | start | k=4 | k=16 |" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["target"], r["k"], r["start"]) for r in summary["transfer"]} == {
        (t, k, s) for t in ("rte", "cb") for k in (4, 16) for s in ("source", "scratch")
    }
    assert all(r["n"] == 2 for r in summary["transfer"])
    source = json.loads((out / "source" / "results.json").read_text())
    assert source["tasks"] == ["mnli", "qnli"] and source["data_sizes"]["mnli"]["train"] == 2000
    assert (out / "summary.png").stat().st_size > 0


def test_recipe_killed_mid_transfer_resumes_with_same_summary_and_runs(tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "run",
        "quickstart",
        f"--output_dir={tmp_path / 'resumed'}",
        f"--tracking.uri={db}",
        "--tracking.experiment=resume",
        *SHORT,
    ]
    killed = run(args, nproc=2, launcher="deepspeed", env={"DEPT_FAULT_KILL_AT_STEP": "10"}, check=False)
    assert killed.returncode != 0
    first = tmp_path / "resumed" / "transfer" / "stories-had" / "k8" / "seed1" / "source"
    assert (first / "checkpoints" / "latest").exists() and not (first / "results.json").exists()
    assert (tmp_path / "resumed" / "source" / "results.json").exists()
    before = mlflow_runs(db, "resume")
    source_mtime = (tmp_path / "resumed" / "source" / "results.json").stat().st_mtime

    resumed = run(args, nproc=2, launcher="deepspeed")
    assert "resumed from step 10" in resumed.stdout + resumed.stderr
    assert (tmp_path / "resumed" / "source" / "results.json").stat().st_mtime == source_mtime  # reused
    after = mlflow_runs(db, "resume")
    assert {r.info.run_id for r in before} <= {r.info.run_id for r in after}
    assert len(after) == 1 + 2 + 2 and all(r.info.status == "FINISHED" for r in after)

    run(
        [
            "run",
            "quickstart",
            f"--output_dir={tmp_path / 'straight'}",
            f"--tracking.uri={db}",
            "--tracking.experiment=straight",
            *SHORT,
        ],
        nproc=2,
        launcher="deepspeed",
    )
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert resumed["transfer"] == straight["transfer"]
    for mine, theirs in zip(resumed["sources"], straight["sources"]):
        assert mine["final_loss"] == pytest.approx(theirs["final_loss"], rel=1e-6)  # float precision (MKL)
        assert mine["test"] == theirs["test"]


def test_methods_small_compares_the_four_methods_at_their_budgets(tmp_path):
    """The comparison recipe at CI size (steps and evaluation rows capped, one seed): one row per method in
    methods.md with its trainable parameters, and the picture of score against size and step time."""
    out = tmp_path / "methods"
    proc = run(
        ["run", "methods_small", f"--output_dir={out}", "--stages.dept.seeds=[1]", "--stages.pt.seeds=[1]",
         "--stages.lora.seeds=[1]", "--stages.finetune.seeds=[1]", "--tracking.enabled=false"],
        env={"DEPT_MAX_STEPS": "6", "DEPT_MAX_EVAL_ROWS": "8"},
    )  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["methods"]}
    assert set(rows) == {"dept", "pt", "lora", "finetune"}
    assert (rows["dept"]["trainable_params"], rows["pt"]["trainable_params"]) == (928, 1024)
    assert rows["lora"]["trainable_params"] == 1120  # r = 1 on q_proj (64 -> 64), v_proj (64 -> 32), 5 layers
    assert rows["finetune"]["trainable_params"] > 200_000
    assert all(r["step_ms"] > 0 and r["n"] == 1 for r in rows.values())
    lora_job = json.loads((out / "lora" / "stories-had" / "k128" / "seed1" / "scratch" / "results.json").read_text())
    assert lora_job["lora_shape"]["budget"] == 16 * 64 and lora_job["lora_shape"]["r"] == 1
    assert "| lora | lora | stories-had | 128 | scratch | 1,120 |" in (out / "methods.md").read_text()
    assert "methods: test score against trainable parameters" in proc.stdout
    assert (out / "methods.png").stat().st_size > 0
