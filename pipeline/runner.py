"""`dept run RECIPE`: execute a recipe's jobs, tracked in MLflow, and aggregate the results.

    dept run quickstart                                   # a shipped recipe by name, one process
    ./launch.sh run quickstart --output_dir=runs/qs-2     # every local rank (2 CPU ranks without GPUs)
    dept run recipes/fewshot_small.yaml --dry_run         # validate, check feasibility, print the plan

Reads top to bottom: load + validate -> plan -> feasibility -> what each job's folder holds (finished with the same
fingerprint: reuse; unfinished with the same fingerprint: resume; anything else: refuse, or with --rerun_changed
start over) -> tracking checked -> parent run -> each job in its child run -> summary.json, summary.md, printed
table and where to look in the MLflow UI.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline import atomic
from pipeline.config import to_dict
from pipeline.errors import PipelineError
from pipeline.fingerprint import differences, job_fingerprint
from pipeline.recipe import Job, Recipe, check_feasible, describe_plan, load_recipe, plan, resolved_dict
from pipeline.summary import aggregates, summarize

log = logging.getLogger(__name__)
JOB_RECORD = "job.json"  # written when a job starts: its fingerprint, to compare on a re-run


@dataclass
class JobState:
    job: Job
    action: str  # reuse | resume | start | rerun (changed, --rerun_changed)
    changed_keys: list[str]


def job_state(job: Job, upstream_changed: bool) -> JobState:
    """What a job's folder holds, compared with the job as configured now."""
    out = Path(job.config.output_dir)
    results, record_file = out / "results.json", out / JOB_RECORD
    if not out.exists() or not (results.exists() or record_file.exists()):
        return JobState(job, "start", [])
    if upstream_changed:
        return JobState(job, "rerun", [f"init_adapter (stage {job.init_from_stage} changes)"])
    digest, record = job_fingerprint(job.config)
    try:
        old = json.loads(record_file.read_text()) if record_file.exists() else {}
    except json.JSONDecodeError:
        old = {}
    if old.get("fingerprint") == digest:
        return JobState(job, "reuse" if results.exists() else "resume", [])
    return JobState(job, "rerun", differences(old.get("record", {}), record) or ["(no record: written by an older "
                                                                                  "version)"])


def job_states(jobs: list[Job]) -> list[JobState]:
    states, changed_stages = [], set()
    for job in jobs:
        state = job_state(job, job.init_from_stage in changed_stages)
        if state.action in ("rerun", "start") and state.job.meta["type"] == "train":
            changed_stages.add(job.stage)
        states.append(state)
    return states


def refuse_changed(states: list[JobState]) -> None:
    changed = [s for s in states if s.action == "rerun"]
    if not changed:
        return
    shown = "; ".join(f"{s.job.key} ({', '.join(s.changed_keys[:4])})" for s in changed[:3])
    more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
    raise PipelineError(f"{len(changed)} job(s) ran before with other settings: {shown}{more}; pass --rerun_changed to "
                        "re-run them (their old results are replaced), or choose another --output_dir")


def tracking_uri(recipe: Recipe) -> str | None:
    from pipeline.tracking import resolve_tracking_uri

    if not recipe.spec.tracking.enabled:
        return None
    default = recipe.output_dir / "mlflow.db"
    return resolve_tracking_uri(recipe.spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or
                                f"sqlite:///{default.resolve()}", Path.cwd())


def run_recipe(name_or_path: str, overrides: dict | None = None, dry_run: bool = False,
               rerun_changed: bool = False) -> dict | None:
    recipe = load_recipe(name_or_path, overrides)
    jobs = plan(recipe)
    check_feasible(recipe, jobs)
    if dry_run:
        print(describe_plan(recipe, jobs))
        return None
    from pipeline import distributed, engine
    from pipeline.job import run_job
    from pipeline.tracking import Tracker, check_reachable

    uri = tracking_uri(recipe)
    if uri:
        check_reachable(uri)  # before any training: a wrong URI fails now, not after hours
    states = job_states(jobs)
    if not rerun_changed:
        refuse_changed(states)
    rank, world = engine.init_distributed(float(jobs[0].config.train.comm_timeout_s))
    out = recipe.output_dir
    if rank == 0:
        print(describe_plan(recipe, jobs))
        atomic.write_text(out / "recipe.resolved.yaml", yaml.safe_dump(resolved_dict(recipe), sort_keys=False))
    experiment = recipe.spec.tracking.experiment or f"dept-{recipe.name}"
    tracker = Tracker(uri, experiment, enabled=bool(uri))
    recipe_key = _recipe_key(recipe)
    with tracker:
        parent = tracker.parent(recipe.name, recipe_key)
        tracker.set_tags({"dept.recipe": recipe.name, "dept.jobs": str(len(jobs)), "dept.world_size": str(world),
                          "mlflow.note.content": recipe.spec.description or recipe.name}, run_id=parent)
        results: dict[str, dict] = {}
        for state in states:
            results[state.job.key] = _execute(state, tracker, recipe_key, run_job)
            gc.collect()
        summary = summarize(recipe.name, jobs, results)
        if rank == 0:
            atomic.write_json(out / "summary.json", summary)
            atomic.write_text(out / "summary.md", summary["markdown"])
            print(summary["markdown"])
            tracker.log_metrics(aggregates(summary), step=0, run_id=parent)
            tracker.set_tags({"mlflow.note.content": summary["markdown"]}, run_id=parent)
            for name in ("recipe.resolved.yaml", "summary.json", "summary.md"):
                tracker.log_artifact(out / name, run_id=parent)
        tracker.finish(parent)
        if rank == 0 and uri:
            print(ui_hint(uri, tracker, parent))
    distributed.barrier()
    return summary


def _recipe_key(recipe: Recipe) -> str:
    import hashlib

    return hashlib.sha256(f"{recipe.name}|{recipe.output_dir.resolve()}".encode()).hexdigest()[:16]


def _execute(state: JobState, tracker, recipe_key: str, run_job) -> dict:
    """Run (or reuse) one job inside its MLflow child run."""
    from pipeline import distributed

    job = state.job
    out = Path(job.config.output_dir)
    results_file = out / "results.json"
    if state.action == "rerun" and distributed.rank() == 0:
        log.info("%s: settings changed (%s): starting it over", job.key, ", ".join(state.changed_keys[:4]))
        shutil.rmtree(out)
    distributed.barrier()
    digest, record = job_fingerprint(job.config)  # the init adapter exists now
    child_key = f"{recipe_key}-{job.key.replace('/', '.')}-{digest[:8]}"
    if state.action == "reuse" and results_file.exists():
        if distributed.rank() == 0:
            log.info("%s: finished earlier with the same settings, reusing %s", job.key, results_file)
        result = json.loads(results_file.read_text())
        if not tracker.is_finished(child_key):  # crashed between results.json and closing the child run
            tracker.finish(tracker.child(job.name, child_key, job_params(job)))
        return result
    if job.config.init_adapter and not Path(job.config.init_adapter).exists():
        raise PipelineError(f"{job.key}: the source adapter {job.config.init_adapter} does not exist; did its stage "
                            "finish? run the recipe from the start")
    if distributed.rank() == 0:
        atomic.write_json(out / JOB_RECORD, {"fingerprint": digest, "record": record, "key": job.key})
    child = tracker.child(job.name, child_key, job_params(job))
    tracker.set_tags({"dept.stage": job.stage, "dept.fingerprint": digest,
                      "dept.world_size": str(distributed.world_size()),
                      **{f"dept.{k}": str(v) for k, v in job.meta.items()}}, run_id=child)
    result = run_job(job.config, callbacks=[tracker.callback_for(child)],
                     on_data=lambda name, context, rows: tracker.log_dataset(rows, name, context, run_id=child))
    if distributed.rank() == 0:
        for name in ("results.json", "adapter", "best_adapter"):
            if (out / name).exists():
                tracker.log_artifact(out / name, run_id=child)
    tracker.finish(child)
    return result


def job_params(job: Job) -> dict:
    """The MLflow params of a job: what is relevant for its method (no backbone lr on DePT jobs, no prompt shape
    on finetune jobs); None values are left out."""
    cfg = to_dict(job.config)
    train, dept, data = cfg["train"], cfg["dept"], cfg["data"]
    params = {"model": cfg["model"], "method": cfg["method"], "ds_config": cfg["ds_config"],
              "batch_size": train["batch_size"], "grad_accum": train["grad_accum"], "steps": train["steps"],
              "warmup_steps": train["warmup_steps"], "seed": train["seed"], "weight_decay": train["weight_decay"],
              "grad_clip": train["grad_clip"], "eval_every": train["eval_every"], "eval_mode": data["eval_mode"],
              "k": data["k"], "init_adapter": cfg["init_adapter"], **job.meta}
    if cfg["method"] == "finetune":
        params["lr"] = train["lr"]
    else:
        params.update(lr_prompt=train["lr_prompt"], num_virtual_tokens=dept["num_virtual_tokens"],
                      max_length=dept["max_length"], lora_alpha=dept["lora_alpha"], prompt_init=dept["prompt_init"])
        if dept["prompt_init"] == "TEXT":
            params["init_text"] = dept["init_text"]
        if cfg["method"] == "dept":
            params.update(lr_lowrank=train["lr_lowrank"], r=dept["r"], budget_tokens=dept["budget_tokens"])
    return {k: v for k, v in params.items() if v is not None}


def ui_hint(uri: str, tracker, parent_id: str | None) -> str:
    """Where the runs are: MLflow 3 opens an experiment on its GenAI traces page, the runs are one switch away."""
    experiment_id = tracker.experiment_id
    store = uri if not uri.startswith(("http://", "https://")) else None
    base = "http://127.0.0.1:5000" if store else uri.rstrip("/")
    lines = ["MLflow:"]
    if store:
        lines.append(f"  mlflow ui --backend-store-uri {store} --host 127.0.0.1 --port 5000 --workers 1")
    lines.append(f"  {base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    if parent_id:
        lines.append(f"  this recipe's parent run: {base}/#/experiments/{experiment_id}/runs/{parent_id}")
    return "\n".join(lines)
