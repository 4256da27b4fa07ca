"""What a user finds in the MLflow UI after `dept run` against a real tracking server over HTTP.

One real `mlflow server` on 127.0.0.1 (sqlite store and artifact proxy in tmp, `--workers 1`, job execution off),
one small recipe run against it from its own working directory (a finetune warm-up that saves its backbone, a DePT
source stage, a transfer stage with k 4 and 8, two seeds, from the source adapter and from scratch), then checks
through the REST API (MlflowClient) of what the UI shows: run names, the parent's description and metrics, params,
lineage tags, curves, artifacts downloaded from another working directory into a fresh folder; and with headless
Chromium (Debian packages chromium and chromium-driver; skipped without them) the runs page itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import free_port

pytestmark = pytest.mark.slow

RECIPE = """\
name: uitest
description: a tiny recipe whose runs the MLflow UI test looks at
model: random:tiny-t5
ds_config: zero3_cpu
output_dir: out
dept: {num_virtual_tokens: 4, r: 2, max_length: 32}
train: {batch_size: 8, steps: 12, warmup_steps: 3, lr_prompt: 0.3, lr_lowrank: 0.01, log_every: 2, eval_every: 6}
data: {eval_mode: score, max_eval_rows: 16}
stages:
  - {name: warmup, method: finetune, save_model: true, tasks: [syn-warm-animal, syn-warm-food], train: {lr: 0.003}}
  - {name: source, model: "stage:warmup", tasks: [syn-source-animal]}
  - name: transfer
    type: transfer
    model: "stage:warmup"
    source: source
    targets: [syn-target-food]
    k: [4, 8]
    seeds: [1, 2]
    control: true
    train: {eval_every: 0}
"""
TRANSFER_NAMES = {
    f"k={k} seed={seed} {start} syn-target-food" for k in (4, 8) for seed in (1, 2) for start in ("source", "scratch")
}
TRAIN_NAMES = {"warmup: syn-warm-animal+syn-warm-food", "source: syn-source-animal"}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    from mlflow.tracking import MlflowClient
    from test_tracking import running_server

    root = tmp_path_factory.mktemp("mlflow-ui")
    server_dir, train_dir = root / "server", root / "train"
    server_dir.mkdir()
    train_dir.mkdir()
    (train_dir / "recipe.yaml").write_text(RECIPE)
    with running_server(server_dir, "--artifacts-destination", str(server_dir / "artifacts")) as uri:
        env = {**os.environ, "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        proc = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "run", "recipe.yaml", f"--tracking.uri={uri}"],
            cwd=train_dir,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("dept-uitest")
        runs = client.search_runs([experiment.experiment_id], max_results=100)
        by_name = {r.info.run_name: r for r in runs}
        yield SimpleNamespace(
            uri=uri,
            client=client,
            experiment=experiment,
            runs=runs,
            by_name=by_name,
            stdout=proc.stdout,
            root=root,
            out=train_dir / "out",
        )


def test_names_description_and_aggregates(tracked):
    parents = [r for r in tracked.runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_name for p in parents] == ["uitest"]
    parent = parents[0]
    assert set(tracked.by_name) == {"uitest"} | TRAIN_NAMES | TRANSFER_NAMES
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in tracked.runs if r is not parent)
    assert all(r.info.status == "FINISHED" for r in tracked.runs)
    assert {tracked.by_name[n].data.tags["dept.stage"] for n in TRANSFER_NAMES} == {"transfer"}
    assert tracked.experiment.tags["mlflow.note.content"] == "a tiny recipe whose runs the MLflow UI test looks at"
    assert tracked.experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # model-training pages

    note = parent.data.tags["mlflow.note.content"]
    summary = json.loads((tracked.out / "summary.json").read_text())
    assert summary["markdown"].strip() in note and "| syn-target-food | source adapter |" in note
    for row in summary["transfer"]:
        stem = f"syn-target-food.k{row['k']}.{row['start']}"
        assert parent.data.metrics[f"{stem}.mean"] == row["mean"] and parent.data.metrics[f"{stem}.std"] == row["std"]
    assert "source.test_accuracy" in parent.data.metrics
    assert {a.path for a in tracked.client.list_artifacts(parent.info.run_id)} == {
        "recipe.resolved.yaml",
        "summary.json",
        "summary.md",
        "summary.png",
    }
    assert parent.data.tags["dept.world_size"] == "1"


def test_params_are_the_methods_and_none_is_never_stored(tracked):
    dept = tracked.by_name["k=4 seed=1 source syn-target-food"].data
    warmup = tracked.by_name["warmup: syn-warm-animal+syn-warm-food"].data
    assert "lr" not in dept.params and warmup.params["lr"] == "0.003"
    assert {"num_virtual_tokens", "r", "lr_prompt", "lora_alpha", "d_model"}.isdisjoint(warmup.params)
    assert dept.params["lora_alpha"] == "8.0" and dept.params["d_model"] == "64" and dept.params["r"] == "2"
    assert dept.params["eval_every"] == "0" and dept.params["trainable_params"] == "448"
    assert tracked.by_name["source: syn-source-animal"].data.params["prompt_init"] == "TEXT"
    assert tracked.by_name["source: syn-source-animal"].data.params["init_text"]
    assert int(warmup.params["trainable_params"]) == int(warmup.params["total_params"]) > 100_000
    for run in tracked.runs:
        assert "None" not in run.data.params.values(), run.info.run_name
        assert "world_size" not in run.data.params and run.data.tags["dept.world_size"] == "1"


def test_curves_without_clutter(tracked):
    run = tracked.by_name["k=8 seed=2 source syn-target-food"]
    history = tracked.client.get_metric_history(run.info.run_id, "lr_prompt")
    assert [m.step for m in history] == [2, 4, 6, 8, 10, 12]  # every log_every steps, not only the last
    rates = [m.value for m in history]
    assert rates.index(max(rates)) == 1 and rates[1:] == sorted(rates[1:], reverse=True)  # warm-up, then decay
    results = json.loads((tracked.out / "transfer/syn-target-food/k8/seed2/source/results.json").read_text())
    assert run.data.metrics["test_score"] == round(results["test_score"], 4)
    for r in tracked.runs:
        keys = set(r.data.metrics)
        assert not any("/" in k for k in keys), keys
        assert not keys & {"step", "eval_n", "test_n", "test_invalid", "eval_invalid"}, r.info.run_name
        assert not any(k.endswith((".n", ".invalid", ".score")) for k in keys), keys
        if r.info.run_name != "uitest":
            assert len(tracked.client.get_metric_history(r.info.run_id, "loss")) == 6
            assert (
                r.data.tags["dept.eval_n"]
                if "dept.eval_n" in r.data.tags
                else r.data.tags["dept.test_syn-warm-animal.n"]
            )
            assert "curves.png" in {a.path for a in tracked.client.list_artifacts(r.info.run_id)}


def test_lineage_and_adapters_stored_once(tracked):
    source = tracked.by_name["source: syn-source-animal"]
    warmup = tracked.by_name["warmup: syn-warm-animal+syn-warm-food"]
    for name in TRANSFER_NAMES:
        tags = tracked.by_name[name].data.tags
        assert tags["dept.backbone_run_id"] == warmup.info.run_id
        assert tags["dept.backbone"] == f"runs:/{warmup.info.run_id}/model"
        if name.split()[2] == "source":
            assert tags["dept.source_run_id"] == source.info.run_id
            assert tags["dept.source_adapter"] == f"runs:/{source.info.run_id}/{source.data.tags['dept.best_adapter']}"
        else:
            assert "dept.source_run_id" not in tags
        # validated once, at the last step: the best adapter is the final one and is stored once
        artifacts = {a.path for a in tracked.client.list_artifacts(tracked.by_name[name].info.run_id)}
        assert artifacts == {"adapter", "curves.png", "results.json"} and tags["dept.best_adapter"] == "adapter"
    assert source.data.tags["dept.backbone_run_id"] == warmup.info.run_id
    assert "model" in {a.path for a in tracked.client.list_artifacts(warmup.info.run_id)}
    source_artifacts = {a.path for a in tracked.client.list_artifacts(source.info.run_id)}
    assert ("best_adapter" in source_artifacts) == (source.data.tags["dept.best_adapter"] == "best_adapter")
    assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in tracked.runs)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_artifacts_download_from_another_machine(tracked):
    """A client that sees only the server: another working directory, a fresh folder, the training folder gone."""
    elsewhere = tracked.root / "elsewhere"
    elsewhere.mkdir()
    hidden = tracked.out.with_name("out.hidden")
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracked.uri}
    run = tracked.by_name["k=4 seed=2 source syn-target-food"]
    tracked.out.rename(hidden)  # nothing on this disk to fall back on
    try:
        for uri, folder in (
            (f"runs:/{run.info.run_id}/adapter", "adapter"),
            (run.data.tags["dept.source_adapter"], "source"),
            (run.data.tags["dept.backbone"], "backbone"),
        ):
            proc = subprocess.run(
                [sys.executable, "-m", "mlflow", "artifacts", "download", "--artifact-uri", uri, "--dst-path", folder],
                cwd=elsewhere,
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert proc.returncode == 0, proc.stderr[-2000:]
    finally:
        hidden.rename(tracked.out)
    for folder in ("adapter/adapter", "source/" + Path(run.data.tags["dept.source_adapter"]).name):
        config = json.loads((elsewhere / folder / "adapter_config.json").read_text())
        assert _sha256(elsewhere / folder / "adapter_model.safetensors") == config["weights_sha256"]
    assert config["weights_sha256"] == run.data.tags["dept.init_adapter_sha256"]
    assert (elsewhere / "backbone" / "model" / "config.json").is_file()


def _hint_urls(stdout: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^\s+(runs|parent run):\s+(\S+)$", stdout, re.M)}


def test_ui_hint_points_at_the_runs(tracked):
    urls = _hint_urls(tracked.stdout)
    exp, parent = tracked.experiment.experiment_id, tracked.by_name["uitest"].info.run_id
    assert urls["runs"] == f"{tracked.uri}/#/experiments/{exp}/runs?workflowType=machine_learning"
    assert urls["parent run"] == f"{tracked.uri}/#/experiments/{exp}/runs/{parent}?workflowType=machine_learning"
    assert "mlflow ui" not in tracked.stdout  # a server is already running: nothing to start


def test_runs_page_in_a_browser(tracked):
    from support.browser_check import check_page, find_browser

    chromium, driver = find_browser()
    if not chromium or not driver:
        pytest.skip("headless Chromium not installed: apt-get install chromium chromium-driver")
    urls = _hint_urls(tracked.stdout)
    shot = tracked.root / "runs-page.png"
    names = ["uitest", *sorted(TRAIN_NAMES), *sorted(TRANSFER_NAMES)]
    # the "+" next to the parent's name unfolds its child runs
    page = check_page(
        urls["runs"], names, click=["css:button[data-component-id*=runnamecellrenderer]"], screenshot=shot, timeout_s=60
    )
    assert not page["missing"], f"not on the runs page: {page['missing']}\n{page['text'][:2000]}"
    assert "11 matching runs" in page["text"]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copy(shot, tracked.out / "runs-page.png")  # kept next to the results for a look by hand
    parent_shot = tracked.root / "parent-page.png"
    parent = check_page(
        urls["parent run"],
        ["uitest", "Summary of 10 jobs below", "source adapter", "from scratch"],
        screenshot=parent_shot,
        timeout_s=60,
    )
    assert not parent["missing"], f"not on the parent run's page: {parent['missing']}\n{parent['text'][:2000]}"
    # the model-training layout, not MLflow 3's GenAI one (its "Evaluations" breadcrumb and sidebar) (#22)
    assert "Evaluations" not in parent["text"], parent["text"][:2000]
    shutil.copy(parent_shot, tracked.out / "parent-page.png")
