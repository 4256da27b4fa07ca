"""Recipes end to end: the quickstart on 2 CPU ranks with its MLflow runs, the real-data few-shot recipe, a
recipe killed mid-transfer and re-run, and a recipe tracked by a real `mlflow server` over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import free_port, run

pytestmark = pytest.mark.slow

# A shortened quickstart for the kill/resume and server tests (same stages, fewer steps and runs).
SHORT = ["--stages.warmup.train.steps=120", "--stages.source.train.steps=40", "--stages.transfer.k=[4,8]",
         "--stages.transfer.seeds=[1]", "--stages.transfer.targets=[syn-target-food]", "--stages.transfer.control=false",
         "--stages.transfer.train.steps=20", "--stages.transfer.train.save_every=5", "--data.max_eval_rows=40"]


def mlflow_runs(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=1000)


def test_quickstart_on_two_ranks_prints_the_table_and_tracks_every_run(tmp_path):
    out, db = tmp_path / "qs", f"sqlite:///{tmp_path / 'mlflow.db'}"
    started = time.time()
    proc = run(["run", "recipes/quickstart.yaml", f"--output_dir={out}", f"--tracking.uri={db}"], nproc=2,
               launcher="deepspeed", timeout=1500)
    elapsed = time.time() - started
    assert "| target | start | k=4 | k=16 | k=32 |" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    k32 = [row for row in summary["transfer"] if row["k"] == 32]
    assert len(k32) == 4 and all(row["n"] == 3 for row in k32)
    assert all(row["mean"] > 60 for row in k32), k32  # chance is 50 on these balanced binary targets
    print(f"quickstart on 2 ranks: {elapsed:.0f} s")

    client, runs = mlflow_runs(db, "dept-quickstart")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1 + 1 + 36
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    assert all(r.info.status == "FINISHED" for r in runs)
    child = next(r for r in children if r.data.tags.get("dept.variant") == "transfer")
    for key in ("model", "num_virtual_tokens", "r", "max_length", "lr_prompt", "lr_lowrank", "batch_size", "steps",
                "world_size", "zero_stage"):
        assert key in child.data.params, key
    assert child.data.params["world_size"] == "2"
    assert {"loss", "lr_prompt", "lr_lowrank", "tokens_per_s", "peak_mem_mb", "test_accuracy"} <= set(child.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
    assert {"results.json", "adapter", "best_adapter"} <= artifacts
    assert child.inputs.dataset_inputs, "datasets logged as inputs"
    assert {"summary.json", "summary.md", "recipe.resolved.yaml"} <= {a.path for a in client.list_artifacts(parents[0].info.run_id)}


def test_fewshot_small_on_real_data(tmp_path):
    out = tmp_path / "fs"
    proc = run(["run", "recipes/fewshot_small.yaml", f"--output_dir={out}",
                f"--tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"], timeout=1500)
    assert "| target | start | k=4 | k=16 | k=32 |" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert {(r["target"], r["k"], r["variant"]) for r in summary["transfer"]} == {
        (t, k, v) for t in ("rte", "cb", "mrpc") for k in (4, 16, 32) for v in ("transfer", "control")}
    assert all(r["n"] == 3 for r in summary["transfer"])
    source = json.loads((out / "source" / "results.json").read_text())
    assert source["tasks"] == ["mnli", "qnli"] and source["data_sizes"]["mnli"]["train"] == 2000


def test_recipe_killed_mid_transfer_resumes_with_same_summary_and_runs(tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["run", "recipes/quickstart.yaml", f"--output_dir={tmp_path / 'resumed'}", f"--tracking.uri={db}",
            "--tracking.experiment=resume", *SHORT]
    killed = run(args, nproc=2, launcher="deepspeed", env={"DEPT_FAULT_KILL_AT_STEP": "10"}, check=False)
    assert killed.returncode != 0
    first_transfer = tmp_path / "resumed" / "transfer" / "syn-target-food" / "k4" / "seed1" / "transfer"
    assert (first_transfer / "checkpoints" / "latest").exists() and not (first_transfer / "results.json").exists()
    assert (tmp_path / "resumed" / "source" / "results.json").exists()
    _, before = mlflow_runs(db, "resume")
    warmup_mtime = (tmp_path / "resumed" / "warmup" / "results.json").stat().st_mtime

    run(args, nproc=2, launcher="deepspeed")
    assert (tmp_path / "resumed" / "warmup" / "results.json").stat().st_mtime == warmup_mtime  # reused
    _, after = mlflow_runs(db, "resume")
    assert {r.info.run_id for r in before} <= {r.info.run_id for r in after}
    assert len(after) == 1 + 2 + 2 and all(r.info.status == "FINISHED" for r in after)

    run(["run", "recipes/quickstart.yaml", f"--output_dir={tmp_path / 'straight'}", f"--tracking.uri={db}",
         "--tracking.experiment=straight", *SHORT], nproc=2, launcher="deepspeed")
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    straight = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert resumed["transfer"] == straight["transfer"]
    for mine, theirs in zip(resumed["sources"], straight["sources"]):
        assert mine["final_loss"] == pytest.approx(theirs["final_loss"], rel=1e-6)  # float precision (MKL)
        assert {k: v for k, v in mine.items() if k != "final_loss"} == {k: v for k, v in theirs.items() if k != "final_loss"}


def test_recipe_tracked_by_a_real_mlflow_server(tmp_path):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
         str(tmp_path / "artifacts")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200:
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail("mlflow server did not come up")
        run(["run", "recipes/quickstart.yaml", f"--output_dir={tmp_path / 'out'}", *SHORT],
            env={"MLFLOW_TRACKING_URI": uri})
        request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=dept-quickstart")
        experiment = json.load(urllib.request.urlopen(request))["experiment"]["experiment_id"]
        body = json.dumps({"experiment_ids": [experiment], "max_results": 100}).encode()
        search = urllib.request.Request(f"{uri}/api/2.0/mlflow/runs/search", data=body,
                                        headers={"Content-Type": "application/json"})
        found = json.load(urllib.request.urlopen(search))["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in found]
        parents = [t for t in tags if "mlflow.parentRunId" not in t]
        assert len(found) == 1 + 2 + 2 and len(parents) == 1
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
