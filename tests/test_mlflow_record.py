"""What `dept run` shows in MLflow (mlflow_record.py), in process and without training: run names, params per method,
outcome params and tags, lineage tags, adapters logged once, the UI hint. The recipe: conftest.SMALL_RECIPE."""

from __future__ import annotations

import json
from pathlib import Path

from support import by_key

from pipeline.mlflow_record import (
    adapter_artifact,
    flatten_params,
    job_params,
    job_tags,
    lineage_tags,
    logged_records,
    outcome_params,
    run_names,
    ui_hint,
)

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
    # cut to the UI's ~20 characters, the names of a stage still differ (#22)
    transfer = [name for key, name in names.items() if key.startswith("transfer/")]
    assert len({name[:18] for name in transfer}) == len(transfer)


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


# ------------------------------------------------------------------------------------------------ where to look


def test_ui_hint_for_a_local_store_and_for_a_server():
    local = ui_hint("sqlite:////data/runs/mlflow.db", "7", "abc123")
    assert (
        "mlflow ui --backend-store-uri sqlite:////data/runs/mlflow.db --host 127.0.0.1 --port 5000 --workers 1" in local
        and "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in local
    )
    assert "http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning" in local
    assert "http://127.0.0.1:5000/#/experiments/7/runs/abc123?workflowType=machine_learning" in local
    remote = ui_hint("https://user:secret@mlflow.example.org:8443/ml/", "3", "def456")
    assert "mlflow ui" not in remote and "secret" not in remote and "user" not in remote
    assert "https://mlflow.example.org:8443/ml/#/experiments/3/runs?workflowType=machine_learning" in remote
    assert "https://mlflow.example.org:8443/ml/#/experiments/3/runs/def456" in remote


# ------------------------------------------------------------------------------------------------ pictures


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


def test_the_records_a_job_logged_are_rebuilt_from_its_results():
    """What the training loop handed its callbacks, for a run created after its job ran (#21)."""
    result = {
        "history": [{"step": 1, "loss": 2.0, "lr_prompt": 0.3}, {"step": 2, "loss": 1.5, "lr_prompt": 0.2}],
        "evals": [{"step": 2, "score": 50.0, "accuracy": 50.0, "n": 8, "invalid": 0}],
        "test": {"score": 62.5, "accuracy": 62.5, "n": 16, "note": "text is not a metric"},
        "best_step": 2,
    }
    assert logged_records(result) == [
        (1, {"step": 1, "loss": 2.0, "lr_prompt": 0.3}),
        (2, {"step": 2, "loss": 1.5, "lr_prompt": 0.2}),
        (2, {"eval_score": 50.0, "eval_accuracy": 50.0, "eval_n": 8, "eval_invalid": 0}),
        (2, {"test_score": 62.5, "test_accuracy": 62.5, "test_n": 16}),
    ]
    assert logged_records({"history": [], "evals": [], "test": None}) == []
