"""What `dept run` tells MLflow and writes next to the results, in process and without training: run names, params
per method, the summary table and its aggregates, lineage tags, adapters logged once, the UI hint, the pictures."""

from __future__ import annotations

import json
import struct
import textwrap
from pathlib import Path

import pytest

from pipeline.mlflow_record import (
    adapter_artifact,
    flatten_params,
    job_params,
    job_tags,
    lineage_tags,
    outcome_params,
    run_names,
    ui_hint,
)
from pipeline.recipe import load_recipe, plan
from pipeline.summary import aggregates, summarize

RECIPE = """
name: small
description: a small recipe for the runner's tests
model: random:tiny-t5
ds_config: zero3_cpu
output_dir: {out}
dept: {{num_virtual_tokens: 4, r: 2, max_length: 32}}
train: {{batch_size: 8, steps: 12, warmup_steps: 3, log_every: 2, eval_every: 6}}
data: {{eval_mode: score, max_eval_rows: 16}}
stages:
  - {{name: warmup, method: finetune, save_model: true, tasks: [syn-warm-animal, syn-warm-food], train: {{lr: 0.003}}}}
  - {{name: source, model: "stage:warmup", tasks: [syn-source-animal]}}
  - {{name: prompt, method: pt, model: "stage:warmup", tasks: [syn-source-animal], dept: {{r: 0}}}}
  - name: transfer
    type: transfer
    model: "stage:warmup"
    source: source
    targets: [syn-target-food]
    k: [4, 8]
    seeds: [1, 2]
    control: true
  - name: wide
    type: transfer
    source: source
    model: "stage:warmup"
    targets: [syn-target-food, syn-target-vehicle]
    k: [4]
    seeds: [1]
"""


@pytest.fixture
def jobs(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out"))
    return plan(load_recipe(str(path)))


def by_key(jobs, key):
    return next(j for j in jobs if j.key == key)


# ------------------------------------------------------------------------------------------------ names, params


def test_run_names_lead_with_what_differs(jobs):
    names = run_names(jobs)
    assert names["warmup"] == "warmup: syn-warm-animal+syn-warm-food"
    # one target in the stage: k, seed and start differ, the target comes last
    assert names["transfer/syn-target-food/k4/seed1/source"] == "k=4 seed=1 source syn-target-food"
    assert names["transfer/syn-target-food/k8/seed2/scratch"] == "k=8 seed=2 scratch syn-target-food"
    # two targets, one k and one seed: the target leads
    assert names["wide/syn-target-vehicle/k4/seed1/source"] == "syn-target-vehicle k=4 seed=1 source"
    assert len(set(names.values())) == len(jobs)
    one_seed = [j for j in jobs if j.stage != "transfer" or j.meta["seed"] == 1]
    assert run_names(one_seed)["transfer/syn-target-food/k4/seed1/scratch"] == "k=4 scratch seed=1 syn-target-food"


def test_params_are_those_the_method_reads(jobs):
    dept = job_params(by_key(jobs, "transfer/syn-target-food/k4/seed1/source"))
    finetune = job_params(by_key(jobs, "warmup"))
    pt = job_params(by_key(jobs, "prompt"))
    source = job_params(by_key(jobs, "source"))
    assert "lr" not in dept and "lr" not in pt and finetune["lr"] == 0.003
    for shape in (
        "num_virtual_tokens",
        "r",
        "lr_prompt",
        "lr_lowrank",
        "lora_alpha",
        "prompt_init",
        "init_text",
        "init_adapter",
    ):
        assert shape not in finetune, shape
    assert {"lr_prompt", "lr_lowrank", "r", "lora_alpha", "num_virtual_tokens", "max_length"} <= set(dept)
    assert dept["lora_alpha"] == 8.0 and dept["r"] == 2 and dept["eval_every"] == 6 and dept["eval_mode"] == "score"
    assert dept["target"] == "syn-target-food" and dept["k"] == 4 and dept["start"] == "source" and dept["seed"] == 1
    assert dept["init_adapter"].endswith("source/best_adapter") and dept["on_length_mismatch"] == "error"
    assert "init_text" not in dept  # the prompt comes from the source adapter, not from a text
    assert source["prompt_init"] == "TEXT" and source["init_text"]  # a fresh TEXT init: its text
    assert "lr_lowrank" not in pt and "r" not in pt and "lora_alpha" not in pt and pt["num_virtual_tokens"] == 4
    assert finetune["tasks"] == "syn-warm-animal,syn-warm-food" and finetune["save_model"] is True
    assert finetune["max_length"] == 32  # the tokenized input length: every method reads it
    assert "mixture_cap" in finetune and "mixture_cap" not in source
    for params in (dept, finetune, pt, source):
        flat = flatten_params(params)
        assert "None" not in flat.values() and None not in params.values()
        for cadence in ("log_every", "save_every", "keep_checkpoints", "comm_timeout_s"):
            assert cadence not in flat  # not in the fingerprint: a tag, a param could not change on re-attach


def test_outcome_params_and_tags(jobs):
    result = {
        "trainable_params": 448,
        "total_params": 229312,
        "config": {"method": "dept"},
        "dept_shape": {"num_virtual_tokens": 4, "r": 2, "max_length": 32, "d_model": 64},
    }
    assert outcome_params(result) == {
        "trainable_params": 448,
        "total_params": 229312,
        "num_virtual_tokens": 4,
        "max_length": 32,
        "d_model": 64,
        "r": 2,
    }
    finetune = outcome_params(
        {"trainable_params": 10, "total_params": 10, "dept_shape": None, "config": {"method": "finetune"}}
    )
    assert finetune == {"trainable_params": 10, "total_params": 10}
    hub = outcome_params({"trainable_params": 1, "data_revisions": {"rte": "bcdcba79", "yelp": "main"}})
    assert hub == {"trainable_params": 1, "data_revision.rte": "bcdcba79", "data_revision.yelp": "main"}
    tags = job_tags(by_key(jobs, "transfer/syn-target-food/k4/seed1/source"), "abc", 1)
    assert tags["dept.stage"] == "transfer" and tags["dept.world_size"] == "1" and tags["dept.log_every"] == "2"
    assert tags["dept.k"] == "4" and tags["dept.start"] == "source" and tags["dept.fingerprint"] == "abc"
    assert job_tags(by_key(jobs, "warmup"), "x", 1)["dept.tasks"] == "syn-warm-animal,syn-warm-food"


# ------------------------------------------------------------------------------------------------ lineage, adapters


def _adapter(folder: Path, sha: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"weights_sha256": sha}))
    return folder


def test_best_adapter_logged_once_when_it_is_the_final_one(tmp_path):
    _adapter(tmp_path / "a" / "adapter", "1" * 64)
    _adapter(tmp_path / "a" / "best_adapter", "1" * 64)
    _adapter(tmp_path / "b" / "adapter", "1" * 64)
    _adapter(tmp_path / "b" / "best_adapter", "2" * 64)
    assert adapter_artifact(tmp_path / "a" / "best_adapter") == "adapter"
    assert adapter_artifact(tmp_path / "b" / "best_adapter") == "best_adapter"
    assert adapter_artifact(tmp_path / "b" / "adapter") == "adapter"


def test_lineage_by_run_id(jobs):
    source = by_key(jobs, "source")
    _adapter(Path(source.config.output_dir) / "adapter", "a" * 64)
    _adapter(Path(source.config.output_dir) / "best_adapter", "b" * 64)
    model = Path(by_key(jobs, "warmup").config.output_dir) / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    run_ids = {"warmup": "w" * 32, "source": "s" * 32}
    tags = lineage_tags(by_key(jobs, "transfer/syn-target-food/k4/seed1/source"), jobs, run_ids)
    assert tags["dept.source_run_id"] == "s" * 32 and tags["dept.source_stage"] == "source"
    assert tags["dept.source_adapter"] == f"runs:/{'s' * 32}/best_adapter"
    assert tags["dept.init_adapter_sha256"] == "b" * 64
    assert tags["dept.backbone_run_id"] == "w" * 32 and tags["dept.backbone"] == f"runs:/{'w' * 32}/model"
    scratch = lineage_tags(by_key(jobs, "transfer/syn-target-food/k4/seed1/scratch"), jobs, run_ids)
    assert "dept.source_run_id" not in scratch and scratch["dept.backbone_run_id"] == "w" * 32
    assert lineage_tags(by_key(jobs, "warmup"), jobs, run_ids) == {}  # a backbone from a preset: nothing to link
    # the same weights in best_adapter: the source run holds them once, under adapter/
    _adapter(Path(source.config.output_dir) / "best_adapter", "a" * 64)
    tags = lineage_tags(by_key(jobs, "transfer/syn-target-food/k4/seed1/source"), jobs, run_ids)
    assert tags["dept.source_adapter"] == f"runs:/{'s' * 32}/adapter"


# ------------------------------------------------------------------------------------------------ summary


def _results(jobs) -> dict:
    scores = {1: 55.00000000000001, 2: 60.0}
    results = {}
    for job in jobs:
        if job.meta["type"] == "train":
            results[job.key] = {
                "test": {
                    "syn-warm-animal.accuracy": 62.50000000000001,
                    "syn-warm-animal.n": 16,
                    "syn-warm-animal.invalid": 0,
                    "syn-warm-animal.score": 62.5,
                    "score": 62.5,
                },
                "best_step": 6,
                "final_loss": 1.2,
                "config": {"method": job.config.method},
                "history": [{"step": s, "loss": 2.0 / s} for s in (2, 4, 6)],
                "evals": [{"step": 6, "score": 50.0}, {"step": 12, "score": 62.5}],
            }
        else:
            bonus = 10.0 if job.meta["start"] == "source" else 0.0
            results[job.key] = {"test_score": scores[job.meta["seed"]] + bonus + job.meta["k"]}
    return results


def test_summary_table_and_aggregates(jobs):
    summary = summarize("small", jobs, _results(jobs))
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
    plain = aggregates(summarize("small", one_stage, _results(one_stage)))
    assert plain["syn-target-food.k8.scratch.mean"] == 65.5 and "transfer.syn-target-food.k8.scratch.mean" not in plain


def test_aggregate_names_never_hold_a_slash():
    summary = {
        "sources": [{"stage": "s", "test": {"org/task.accuracy": 50.0}}],
        "transfer": [{"stage": "t", "target": "org/task", "k": 4, "start": "source", "mean": 50.0, "std": 0.0, "n": 1}],
    }
    assert set(aggregates(summary)) == {"org_task.k4.source.mean", "org_task.k4.source.std", "s.test_org_task.accuracy"}


# ------------------------------------------------------------------------------------------------ where to look


def test_ui_hint_for_a_local_store_and_for_a_server():
    local = ui_hint("sqlite:////data/runs/mlflow.db", "7", "abc123")
    assert (
        "mlflow ui --backend-store-uri sqlite:////data/runs/mlflow.db --host 127.0.0.1 --port 5000 --workers 1" in local
        and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in local
    )
    assert "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning" in local
    assert "http://127.0.0.1:5000/#/experiments/7/runs/abc123" in local
    remote = ui_hint("https://user:secret@mlflow.example.org:8443/ml/", "3", "def456")
    assert "mlflow ui" not in remote and "secret" not in remote and "user" not in remote
    assert "https://mlflow.example.org:8443/ml/#/experiments/3/runs?workflowType=machine_learning" in remote
    assert "https://mlflow.example.org:8443/ml/#/experiments/3/runs/def456" in remote


# ------------------------------------------------------------------------------------------------ pictures


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_pictures(jobs, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws summary.png and curves.png (pip install matplotlib)")
    from pipeline.plots import DPI, plot_job, plot_summary

    results = _results(jobs)
    summary = summarize("small", jobs, results)
    train = {j.stage: results[j.key] for j in jobs if j.meta["type"] == "train"}
    path = plot_summary(summary, train, tmp_path / "summary.png")
    width, height = _png_size(path)
    assert width == round(5.2 * 4 * DPI) and height == round(4.0 * DPI)  # loss, validation, two transfer stages
    only_transfer = plot_summary(summary, {}, tmp_path / "transfer.png")
    assert _png_size(only_transfer)[0] == round(5.2 * 2 * DPI)
    result = {
        "history": [
            {
                "step": s,
                "loss": 3.0 / s,
                "lr_prompt": 0.3 * min(s / 4, (12 - s + 1) / 9),
                "lr_lowrank": 1e-4 * min(s / 4, (12 - s + 1) / 9),
            }
            for s in range(1, 13)
        ],
        "evals": [{"step": 6, "score": 50.0}, {"step": 12, "score": 62.5}],
        "best_step": 12,
        "test_score": 60.0,
    }
    curves = plot_job(result, "k=4 seed=1 source syn-target-food", tmp_path / "job" / "curves.png")
    assert _png_size(curves) == (round(13 * DPI), round(3.6 * DPI))
    empty = plot_job({"history": [], "evals": []}, "nothing logged", tmp_path / "empty.png")
    assert empty.stat().st_size > 1000
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_summary({"recipe": "r", "transfer": [], "sources": []}, {}, tmp_path / "none.png")


def test_plots_import_matplotlib_only_when_drawing():
    import subprocess
    import sys

    code = textwrap.dedent("""
        import sys
        import pipeline.plots, pipeline.runner, pipeline.summary, pipeline.tracking
        print("matplotlib" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_params_and_inherited_dept_keys_follow_the_method_table(jobs):
    """MLflow params and a recipe's dept section reach a job only with fields its method reads
    (config.METHOD_FIELDS); a field no method singles out is every method's."""
    from pipeline.config import METHOD_FIELDS, unread_fields

    for job in jobs:
        params = job_params(job)
        for path in unread_fields(job.config.method):
            assert path[-1] not in params, (job.key, path)
        shown = {path[-1] for path in METHOD_FIELDS[job.config.method]} & set(params)
        assert shown, job.key
        if job.config.method != "dept":  # the recipe's r: 2 is for its DePT stages
            assert job.config.dept.r in (None, 0), job.key
