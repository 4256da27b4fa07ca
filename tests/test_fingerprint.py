"""A recipe edited after a run is never answered with old results (issue #12.3): what a job's folder holds against
the job as configured now (`fingerprint.recorded_state`), the runner's reuse / resume / refuse decision and its
one-line refusal, and a real re-run through `dept run` with MLflow (in process, one rank, a few steps)."""

from __future__ import annotations

import copy
import dataclasses
import json
import textwrap
from pathlib import Path

import pytest

from pipeline.config import JobConfig
from pipeline.errors import PipelineError
from pipeline.fingerprint import JOB_RECORD, job_fingerprint, recorded_state
from pipeline.options import build
from pipeline.recipe import load_recipe, plan
from pipeline.runner import job_states, refuse_changed


def config(out, data, **train) -> JobConfig:
    return build(
        JobConfig,
        {
            "model": "random:tiny-t5",
            "output_dir": str(out),
            "data": {"train_file": str(data)},
            "dept": {"num_virtual_tokens": 4, "r": 2, "max_length": 16},
            "train": {"batch_size": 4, "steps": 8, "warmup_steps": 2, **train},
        },
        "job",
    )


def finish(cfg: JobConfig) -> None:
    """What a finished job leaves: its start record and results.json carrying its fingerprint."""
    digest, record = job_fingerprint(cfg)
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / JOB_RECORD).write_text(json.dumps({"fingerprint": digest, "record": record}))
    (out_dir / "results.json").write_text(json.dumps({"fingerprint": digest}))


def checkpoint(cfg: JobConfig) -> None:
    """What an interrupted job leaves: its start record and a complete checkpoint, no results.json."""
    digest, record = job_fingerprint(cfg)
    out = Path(cfg.output_dir)
    (out / "checkpoints" / "step-4").mkdir(parents=True)
    (out / "checkpoints" / "step-4" / "complete").write_text("")
    (out / "checkpoints" / "latest").write_text("step-4")
    (out / JOB_RECORD).write_text(json.dumps({"fingerprint": digest, "record": record}))


def test_an_empty_folder_is_new_and_a_finished_job_with_the_same_settings_is_reused(tmp_path, toy_task):
    cfg = config(tmp_path / "job", toy_task)
    assert recorded_state(cfg) == ("new", [])
    finish(cfg)
    assert recorded_state(cfg) == ("finished", [])


def test_a_changed_value_is_named(tmp_path, toy_task):
    finish(config(tmp_path / "job", toy_task, lr_prompt=0.3))
    assert recorded_state(config(tmp_path / "job", toy_task, lr_prompt=0.001)) == (
        "changed",
        ["config.train.lr_prompt"],
    )


def test_changed_data_is_named(tmp_path, toy_task):
    data = tmp_path / "rows.jsonl"
    data.write_text(toy_task.read_text())
    finish(config(tmp_path / "job", data))
    data.write_text(toy_task.read_text().replace('"1"', '"0"', 1))
    state, keys = recorded_state(config(tmp_path / "job", data))
    assert state == "changed" and keys and all(k.startswith("data") for k in keys), keys


def test_what_cannot_change_the_result_does_not_count(tmp_path, toy_task):
    finish(config(tmp_path / "job", toy_task))
    # logging and checkpoint cadence, the communication timeout, and a rate the method never reads (DePT: lr)
    same = config(tmp_path / "job", toy_task, log_every=1, save_every=2, comm_timeout_s=60, lr=0.5)
    assert recorded_state(same) == ("finished", [])


def test_an_interrupted_job_resumes_only_with_its_own_settings(tmp_path, toy_task):
    checkpoint(config(tmp_path / "job", toy_task))
    assert recorded_state(config(tmp_path / "job", toy_task)) == ("resumable", [])
    assert recorded_state(config(tmp_path / "job", toy_task, steps=16)) == ("changed", ["config.train.steps"])


RECIPE = """\
name: edited
model: random:tiny-t5
ds_config: zero3_cpu
output_dir: {out}
dept: {{num_virtual_tokens: 4, r: 2, max_length: 32}}
train: {{batch_size: 4, steps: 4, warmup_steps: 1, log_every: 1}}
data: {{eval_mode: score, max_eval_rows: 8}}
tracking: {{uri: "sqlite:///{out}/mlflow.db", experiment: edited}}
stages:
  - {{name: source, tasks: [syn-source-animal]}}
  - {{name: transfer, type: transfer, source: source, targets: [syn-target-food], k: [4], seeds: [1]}}
"""


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(out=tmp_path / "out"))
    return path


def test_a_changed_source_stage_is_refused_naming_jobs_and_keys_and_its_transfers_follow(recipe_file):
    jobs = plan(load_recipe(str(recipe_file)))
    for job in jobs:
        finish(job.config)
    states = job_states(jobs)
    assert [s.action for s in states] == ["reuse", "reuse"]
    refuse_changed(states)  # nothing changed: no refusal

    edited = plan(load_recipe(str(recipe_file), {"stages.source.train.lr_prompt": "0.01"}))
    states = job_states(edited)
    assert [s.action for s in states] == ["rerun", "rerun"]  # the transfer starts from the changed source adapter
    with pytest.raises(PipelineError) as refused:
        refuse_changed(states)
    line = str(refused.value)
    assert "\n" not in line and "2 job(s) ran before with other settings" in line
    assert "source (config.train.lr_prompt)" in line and "--rerun_changed" in line


@pytest.mark.usefixtures("one_process_group")
def test_dept_run_reuses_refuses_and_reruns_and_mlflow_follows(recipe_file, capsys):
    from mlflow.tracking import MlflowClient

    from pipeline.cli import main

    out = recipe_file.parent / "out"
    assert main(["run", str(recipe_file)]) == 0
    first = json.loads((out / "source" / "results.json").read_text())

    assert main(["run", str(recipe_file)]) == 0  # the same settings: reused, nothing trained again
    assert json.loads((out / "source" / "results.json").read_text()) == first
    assert "2 jobs (2 reused)" in capsys.readouterr().out

    assert main(["run", str(recipe_file), "--train.lr_prompt=0.01"]) == 2
    err = capsys.readouterr().err
    assert "ran before with other settings" in err and "config.train.lr_prompt" in err, err
    assert json.loads((out / "source" / "results.json").read_text()) == first  # nothing touched
    resolved = (out / "recipe.resolved.yaml").read_text()
    assert "lr_prompt: 0.01" not in resolved  # the run directory still describes its results

    assert main(["run", str(recipe_file), "--train.lr_prompt=0.01", "--rerun_changed"]) == 0
    again = json.loads((out / "source" / "results.json").read_text())
    assert again["fingerprint"] != first["fingerprint"]
    assert "lr_prompt: 0.01" in (out / "recipe.resolved.yaml").read_text()

    client = MlflowClient(f"sqlite:///{out}/mlflow.db")
    experiment = client.get_experiment_by_name("edited")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    # one child run per (job, fingerprint): the first settings' runs stay as they were, the re-run has its own
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in runs)
    by_fingerprint = {}
    for run in children:
        by_fingerprint.setdefault(run.data.tags["dept.fingerprint"], []).append(run)
    assert len(by_fingerprint) == 4
    sources = [r for r in children if r.data.tags["dept.stage"] == "source"]
    assert sorted(float(r.data.params["lr_prompt"]) for r in sources) == [0.01, 0.3]
    print(textwrap.shorten(err, 300))


def _changed(value):
    """Another valid value of a field, for the fingerprint's what-counts checks."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if dataclasses.is_dataclass(value):  # a whole section a method reads (lora): one of its fields changed
        return dataclasses.replace(value, dropout=value.dropout + 0.1)
    return {"TEXT": "VOCAB", "error": "pad", None: "elsewhere/adapter"}.get(value, f"{value} (changed)")


@pytest.mark.parametrize("method", ["dept", "pt", "lora", "finetune"])
def test_the_fingerprint_covers_what_the_method_reads(method, tmp_path):
    """The one table of what each method reads (config.METHOD_FIELDS) decides the fingerprint: a field only other
    methods read cannot change it; one this method reads does."""
    from pipeline.config import METHOD_FIELDS, unread_fields
    from pipeline.fingerprint import STILL_FINGERPRINTED

    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps({"source": "a", "target": "b"}) + "\n")
    base = config(tmp_path / "out", data)
    base.method = method
    digest = job_fingerprint(base)[0]
    legacy = STILL_FINGERPRINTED.get(method, set())
    for path, expect_same in [(p, True) for p in unread_fields(method) - legacy] + [
        (p, False) for p in METHOD_FIELDS[method] | legacy
    ]:
        cfg = copy.deepcopy(base)
        node = cfg
        for part in path[:-1]:
            node = getattr(node, part)
        setattr(node, path[-1], _changed(getattr(node, path[-1])))
        assert (job_fingerprint(cfg)[0] == digest) is expect_same, (method, path)
