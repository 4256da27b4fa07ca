"""`dept run RECIPE`: execute a recipe's jobs, tracked in MLflow, and aggregate the results.

    dept run quickstart                                   # a shipped recipe by name, one process
    ./launch.sh run quickstart --output_dir=runs/qs-2     # every local rank (2 CPU ranks without GPUs)
    dept run recipes/fewshot_small.yaml --dry_run         # validate, check feasibility, print the plan

Reads top to bottom: load + validate -> plan -> feasibility -> what each job's folder holds (finished with the same
fingerprint: reuse; unfinished with the same fingerprint: resume; anything else: refuse, or with --rerun_changed
start over) -> tracking checked -> parent run -> each job in its child run -> summary.json, summary.md,
summary.png, printed table and where to look in the MLflow UI.

What MLflow shows (rank 0 logs): the experiment's description is the recipe's `description`; the parent run (named
after the recipe) holds the summary table as its description, the (target, k, start) means and stds as metrics and
summary.png; each job's child run is named by what differs between jobs (`run_names`), carries the params its
method reads (`job_params`, `outcome_params`), its stage, world size and lineage as tags (`dept.source_run_id`,
`dept.backbone_run_id`), its curves as metrics and curves.png, results.json and its adapters as artifacts.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline import atomic
from pipeline.config import to_dict
from pipeline.errors import PipelineError
from pipeline.fingerprint import job_fingerprint, recorded_state
from pipeline.recipe import Job, Recipe, check_feasible, describe_plan, load_recipe, plan, resolved_dict
from pipeline.summary import aggregates, summarize

log = logging.getLogger(__name__)


@dataclass
class JobState:
    job: Job
    action: str  # reuse | resume | start | rerun (changed, --rerun_changed)
    changed_keys: list[str]


def job_state(job: Job, upstream_changed: bool) -> JobState:
    """What a job's folder holds, compared with the job as configured now (`fingerprint.recorded_state`)."""
    state, changed = recorded_state(job.config)
    if state == "new":
        return JobState(job, "start", [])
    if upstream_changed:
        return JobState(job, "rerun", [f"init_adapter (stage {job.init_from_stage} changes)"])
    action = {"finished": "reuse", "resumable": "resume", "changed": "rerun"}[state]
    return JobState(job, action, changed)


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
    raise PipelineError(
        f"{len(changed)} job(s) ran before with other settings: {shown}{more}; pass --rerun_changed to "
        "re-run them (their old results are replaced), or choose another --output_dir"
    )


def tracking_uri(recipe: Recipe) -> str | None:
    from pipeline.tracking import resolve_tracking_uri

    if not recipe.spec.tracking.enabled:
        return None
    default = recipe.output_dir / "mlflow.db"
    return resolve_tracking_uri(
        recipe.spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{default.resolve()}",
        Path.cwd(),
    )


def run_recipe(
    name_or_path: str, overrides: dict | None = None, dry_run: bool = False, rerun_changed: bool = False
) -> dict | None:
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
    started = time.time()
    rank, world = engine.init_distributed(float(jobs[0].config.train.comm_timeout_s))
    out = recipe.output_dir
    if rank == 0:
        print(describe_plan(recipe, jobs))
        atomic.write_text(out / "recipe.resolved.yaml", yaml.safe_dump(resolved_dict(recipe), sort_keys=False))
    experiment = recipe.spec.tracking.experiment or f"dept-{recipe.name}"
    tracker = Tracker(uri, experiment, enabled=bool(uri))
    recipe_key = _recipe_key(recipe)
    names = run_names(jobs)
    with tracker:
        parent = tracker.parent(recipe.name, recipe_key)
        tracker.describe_experiment(recipe.spec.description)
        tracker.set_tags(
            {
                "dept.recipe": recipe.name,
                "dept.jobs": str(len(jobs)),
                "dept.world_size": str(world),
                "dept.output_dir": str(out.resolve()),
                "mlflow.note.content": _parent_note(recipe, jobs, None),
            },
            run_id=parent,
        )
        results: dict[str, dict] = {}
        run_ids: dict[str, str | None] = {}
        for state in states:
            job = state.job
            lineage = lineage_tags(job, jobs, run_ids) if tracker.active else {}
            results[job.key], run_ids[job.key] = _execute(state, tracker, recipe_key, run_job, names[job.key], lineage)
            gc.collect()
        from pipeline._version import __version__

        run = {
            "jobs": len(jobs),
            "reused": sum(s.action == "reuse" for s in states),
            "world_size": world,
            "seconds": round(time.time() - started, 1),
            "version": __version__,
        }
        summary = summarize(recipe.name, jobs, results, run)
        if rank == 0:
            atomic.write_json(out / "summary.json", summary)
            atomic.write_text(out / "summary.md", summary["markdown"])
            print(summary["markdown"])
            from pipeline.plots import plot_summary

            train_results = {j.stage: results[j.key] for j in jobs if j.meta["type"] == "train"}
            _picture(plot_summary, summary, train_results, out / "summary.png")
            tracker.log_metrics(aggregates(summary), step=0, run_id=parent)
            tracker.set_tags({"mlflow.note.content": _parent_note(recipe, jobs, summary)}, run_id=parent)
            for name in ("recipe.resolved.yaml", "summary.json", "summary.md", "summary.png"):
                if (out / name).exists():
                    tracker.log_artifact(out / name, run_id=parent)
        tracker.finish(parent)
        if rank == 0 and uri:
            print(ui_hint(uri, tracker.experiment_id, parent))
    distributed.barrier()
    return summary


def _parent_note(recipe: Recipe, jobs: list[Job], summary: dict | None) -> str:
    """The parent run's description in the MLflow UI (markdown): the recipe's description and, once every job
    is done, the summary table."""
    lines = [recipe.spec.description.strip()] if recipe.spec.description.strip() else []
    if summary is None:
        lines.append(f"Running {len(jobs)} jobs; the summary table appears here when they are done.")
    else:
        lines += [
            summary["markdown"].strip(),
            "Pictures: `summary.png` (artifacts of this run) and `curves.png` in each child run. The table's "
            "cells are this run's metrics `<target>.k<k>.<start>.mean` / `.std`.",
        ]
    return "\n\n".join(lines)


def _picture(plot, *args) -> Path | None:
    """Draw a picture; a missing matplotlib or a failing plot costs the picture, never the run."""
    try:
        return plot(*args)
    except ImportError as exc:
        log.warning("no %s: matplotlib is not installed (%s); pip install matplotlib", args[-1], exc)
    except Exception as exc:  # noqa: BLE001 -- see docstring
        log.warning("could not draw %s: %s: %s", args[-1], type(exc).__name__, exc)
    return None


def _recipe_key(recipe: Recipe) -> str:
    import hashlib

    return hashlib.sha256(f"{recipe.name}|{recipe.output_dir.resolve()}".encode()).hexdigest()[:16]


def _execute(
    state: JobState, tracker, recipe_key: str, run_job, name: str, lineage: dict[str, str]
) -> tuple[dict, str | None]:
    """Run (or reuse) one job inside its MLflow child run: (its results, the child run's id)."""
    from pipeline import distributed

    job = state.job
    out = Path(job.config.output_dir)
    results_file = out / "results.json"
    if state.action == "rerun" and distributed.rank() == 0:
        log.info("%s: settings changed (%s): starting it over", job.key, ", ".join(state.changed_keys[:4]))
        shutil.rmtree(out)
    distributed.barrier()
    digest, _ = job_fingerprint(job.config)  # the init adapter exists now
    child_key = f"{recipe_key}-{job.key.replace('/', '.')}-{digest[:8]}"
    if state.action == "reuse" and results_file.exists():
        if distributed.rank() == 0:
            log.info("%s: finished earlier with the same settings, reusing %s", job.key, results_file)
        result = json.loads(results_file.read_text())
        if tracker.is_finished(child_key):
            return result, tracker.run_id_for(child_key)
        # crashed between results.json and closing the child run: log what the run is missing, then close it
        child = tracker.child(name, child_key, job_params(job))
        tracker.set_tags({**job_tags(job, digest), **lineage}, run_id=child)
        if distributed.rank() == 0:
            _log_outcome(tracker, job, child, result, name)
        tracker.finish(child)
        return result, child
    if job.config.init_adapter and not Path(job.config.init_adapter).exists():
        raise PipelineError(
            f"{job.key}: the source adapter {job.config.init_adapter} does not exist; did its stage "
            "finish? run the recipe from the start"
        )
    child = tracker.child(name, child_key, job_params(job))
    tracker.set_tags({**job_tags(job, digest), **lineage}, run_id=child)
    callback = tracker.callback_for(child, invalid_curves=job.config.data.eval_mode == "generate")
    result = run_job(
        job.config,
        callbacks=[callback],
        on_data=lambda data, context, rows: tracker.log_dataset(rows, data, context, run_id=child),
    )
    if distributed.rank() == 0:
        _log_outcome(tracker, job, child, result, name)
    tracker.finish(child)
    return result, child


# ----------------------------------------------------------------------------------------------- what MLflow shows


def run_names(jobs: list[Job]) -> dict[str, str]:
    """The MLflow run name of each job: what differs between the jobs of a stage comes first, so that the runs
    table's narrow name column tells them apart ("k=4 seed=1 source syn-target-food" when a stage has one target;
    "cb k=4 seed=1 scratch" when it has several; "k=4 scratch seed=1 rte" with one seed), the target last among
    what does not differ. Train jobs: "<stage>: <tasks>". The stage is a tag."""
    names = {}
    methods = {j.config.method for j in jobs if j.meta["type"] == "transfer"}
    for job in jobs:
        if job.meta["type"] == "train":
            names[job.key] = job.name
            continue
        peers = [j for j in jobs if j.stage == job.stage]
        parts = {
            "target": str(job.meta["target"]),
            "k": f"k={job.meta['k']}",
            "seed": f"seed={job.meta['seed']}",
            "start": str(job.meta["start"]),
        }
        varying = [f for f in parts if len({str(j.meta[f]) for j in peers}) > 1]
        constant = [f for f in ("k", "seed", "start", "target") if f not in varying]
        name = " ".join(parts[f] for f in varying + constant)
        names[job.key] = f"{job.config.method} {name}" if len(methods) > 1 else name  # DePT and PT stages side by side
    return names


def job_params(job: Job) -> dict:
    """The MLflow params of a job as configured: what its method reads (no backbone lr on DePT/PT jobs, no prompt
    shape or prompt learning rates on finetune jobs), only fields the job's fingerprint covers (a param cannot
    change when a finished job is re-attached; logging and checkpoint cadence are tags), None left out. What is
    known only once the job ran (resolved shape, d, trainable parameters) is added by `outcome_params`."""
    cfg = to_dict(job.config)
    train, dept, data = cfg["train"], cfg["dept"], cfg["data"]
    method = cfg["method"]
    params = {
        "method": method,
        "model": cfg["model"],
        "ds_config": cfg["ds_config"],
        "batch_size": train["batch_size"],
        "grad_accum": train["grad_accum"],
        "steps": train["steps"],
        "warmup_steps": train["warmup_steps"],
        "seed": train["seed"],
        "weight_decay": train["weight_decay"],
        "grad_clip": train["grad_clip"],
        "max_train_rows": data["max_train_rows"],
    }
    if job.meta["type"] == "train":
        params["tasks"] = ",".join(map(str, job.meta["tasks"])) or None
        if len(data["tasks"]) > 1:
            params["mixture_cap"] = data["mixture_cap"]
    else:
        params.update(target=job.meta["target"], k=data["k"], start=job.meta["start"])
    if data["evaluate"]:
        params.update(eval_every=train["eval_every"], eval_mode=data["eval_mode"], max_eval_rows=data["max_eval_rows"])
        if data["eval_mode"] == "generate":
            params["max_new_tokens"] = data["max_new_tokens"]
    else:
        params["evaluate"] = False
    for flag in ("pad_to_max_length", "group_by_length"):
        if train[flag]:
            params[flag] = True
    if method == "finetune":
        params.update(lr=train["lr"], save_model=cfg["save_model"])
        return {k: v for k, v in params.items() if v is not None}
    params.update(
        lr_prompt=train["lr_prompt"],
        num_virtual_tokens=dept["num_virtual_tokens"],
        max_length=dept["max_length"],
        prompt_init=dept["prompt_init"],
        init_adapter=cfg["init_adapter"],
    )
    if dept["prompt_init"] == "TEXT" and not cfg["init_adapter"]:
        params["init_text"] = dept["init_text"]
    if cfg["init_adapter"]:
        params["on_length_mismatch"] = cfg["on_length_mismatch"]
    if method == "dept":
        params.update(
            lr_lowrank=train["lr_lowrank"],
            r=dept["r"],
            budget_tokens=dept["budget_tokens"],
            lora_alpha=dept["lora_alpha"],
        )
    return {k: v for k, v in params.items() if v is not None}


def outcome_params(result: dict) -> dict:
    """Params known once a job ran: trainable and total parameter counts; for prompt methods the resolved shape
    (m, r, s: from the recipe, else the init adapter, else the defaults) and the backbone's width d; the hub
    revision of each hub dataset it read."""
    params = {"trainable_params": result.get("trainable_params"), "total_params": result.get("total_params")}
    shape = result.get("dept_shape") or {}
    if shape:
        params.update(
            num_virtual_tokens=shape.get("num_virtual_tokens"),
            max_length=shape.get("max_length"),
            d_model=shape.get("d_model"),
        )
        if result.get("config", {}).get("method") == "dept":
            params["r"] = shape.get("r")
    for task, revision in sorted((result.get("data_revisions") or {}).items()):
        params[f"data_revision.{task}"] = revision  # the hub commit read ("main": unpinned)
    return {k: v for k, v in params.items() if v is not None}


def job_tags(job: Job, digest: str) -> dict[str, str]:
    """Tags of a job's run: its stage and place in the plan, the world size (a job may resume on another one, a
    param could not change), cadences that do not change results."""
    from pipeline import distributed

    meta = {k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)) for k, v in job.meta.items()}
    return {
        "dept.stage": job.stage,
        "dept.fingerprint": digest,
        "dept.world_size": str(distributed.world_size()),
        "dept.job": job.key,
        "dept.output_dir": str(Path(job.config.output_dir).resolve()),
        "dept.log_every": str(job.config.train.log_every),
        "dept.save_every": str(job.config.train.save_every),
        **{f"dept.{k}": v for k, v in meta.items()},
    }


def adapter_artifact(adapter_dir: str | Path) -> str:
    """The artifact path under which a job's run holds the adapter in `adapter_dir` (`<job>/adapter` or
    `<job>/best_adapter`): `best_adapter` is not logged when it has the same weights as `adapter` (the sha256 its
    adapter_config.json records)."""
    adapter_dir = Path(adapter_dir)
    if adapter_dir.name == "best_adapter" and _same_weights(adapter_dir, adapter_dir.parent / "adapter"):
        return "adapter"
    return adapter_dir.name


def _same_weights(a: Path, b: Path) -> bool:
    try:
        first = json.loads((a / "adapter_config.json").read_text()).get("weights_sha256")
        second = json.loads((b / "adapter_config.json").read_text()).get("weights_sha256")
    except (OSError, json.JSONDecodeError):
        return False
    return bool(first) and first == second


def lineage_tags(job: Job, jobs: list[Job], run_ids: dict[str, str | None]) -> dict[str, str]:
    """Where a job starts from, by MLflow run id: the run that produced its init (source) adapter and the run of
    the finetune stage that saved its backbone, with `runs:/<id>/<path>` URIs a client can download from."""
    tags: dict[str, str] = {}
    init = job.config.init_adapter
    if job.init_from_stage:
        source = next((j for j in jobs if j.stage == job.init_from_stage and j.meta["type"] == "train"), None)
        tags["dept.source_stage"] = job.init_from_stage
        run_id = run_ids.get(source.key) if source else None
        if run_id:
            tags["dept.source_run_id"] = run_id
            tags["dept.source_adapter"] = f"runs:/{run_id}/{adapter_artifact(init)}"
    if init:
        tags["dept.init_adapter_path"] = str(Path(init).resolve())
        try:
            sha = json.loads((Path(init) / "adapter_config.json").read_text()).get("weights_sha256")
        except (OSError, json.JSONDecodeError):
            sha = None
        if sha:
            tags["dept.init_adapter_sha256"] = sha
    model = Path(job.config.model).expanduser()
    for producer in jobs:
        if (
            producer.config.save_model
            and producer.meta["type"] == "train"
            and (Path(producer.config.output_dir) / "model").resolve() == model.resolve()
        ):
            tags["dept.backbone_stage"] = producer.stage
            run_id = run_ids.get(producer.key)
            if run_id:
                tags["dept.backbone_run_id"] = run_id
                if _model_fits(model):
                    tags["dept.backbone"] = f"runs:/{run_id}/model"
    return tags


def _model_fits(model_dir: Path) -> bool:
    """Whether a saved backbone is small enough to log as an artifact (DEPT_MLFLOW_MAX_MODEL_MB, default 2048)."""
    limit_mb = float(os.environ.get("DEPT_MLFLOW_MAX_MODEL_MB", "2048"))
    if not model_dir.is_dir():
        return False
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    return size <= limit_mb * 2**20


def _log_outcome(tracker, job: Job, run_id: str | None, result: dict, name: str) -> None:
    """Rank 0, after a job: curves.png (also without tracking); to its run (`run_id`) the resolved params, the
    reported test score, best step, curves.png, results.json, adapters (best_adapter only when its weights differ
    from the final adapter's) and a backbone saved by a finetune stage."""
    from pipeline.plots import plot_job

    out = Path(job.config.output_dir)
    picture = out / "curves.png"
    if not picture.exists():  # drawn with tracking off as well
        _picture(plot_job, result, f"{name} ({job.stage})", picture)
    if run_id is None:
        return
    try:
        tracker.log_params(outcome_params(result), run_id=run_id)
    except PipelineError as exc:  # a job re-attached with another resolved shape: keep the run, say so
        log.warning("%s: %s", job.key, exc)
    if isinstance(result.get("test_score"), (int, float)):  # the score the summary reports, at the best step
        tracker.log_metrics(
            {"test_score": round(result["test_score"], 4)}, step=result.get("best_step") or 0, run_id=run_id
        )
    tags = {"dept.best_step": str(result.get("best_step"))} if result.get("best_step") is not None else {}
    if (out / "best_adapter").is_dir():
        tags["dept.best_adapter"] = adapter_artifact(out / "best_adapter")
    for item in ("results.json", "curves.png", "adapter"):
        if (out / item).exists():
            tracker.log_artifact(out / item, run_id=run_id)
    if (out / "best_adapter").is_dir() and tags["dept.best_adapter"] == "best_adapter":
        tracker.log_artifact(out / "best_adapter", run_id=run_id)
    if job.config.save_model and (out / "model").is_dir():
        if _model_fits(out / "model"):
            tracker.log_artifact(out / "model", run_id=run_id)
            tags["dept.model"] = f"runs:/{run_id}/model"
        else:
            log.warning(
                "%s: the saved backbone %s is over DEPT_MLFLOW_MAX_MODEL_MB; recorded by path only",
                job.key,
                out / "model",
            )
        tags["dept.model_path"] = str((out / "model").resolve())
    tracker.set_tags(tags, run_id=run_id)


def ui_hint(uri: str, experiment_id: str | None, parent_id: str | None, port: int = 5000) -> str:
    """Where to look. MLflow 3 opens an experiment on its GenAI pages (traces: "No data available"); the runs are
    at `#/experiments/<id>/runs?workflowType=machine_learning`. A server URI is linked directly (credentials
    left out); a database store first needs a UI started on it."""
    parsed = urllib.parse.urlparse(uri)
    lines = ["MLflow: this recipe's runs (parent run with the summary table and one child run per job):"]
    if parsed.scheme.lower() in ("http", "https"):
        netloc = parsed.hostname or ""
        if ":" in netloc:  # an IPv6 address
            netloc = f"[{netloc}]"
        if parsed.port:
            netloc += f":{parsed.port}"
        base = urllib.parse.urlunparse((parsed.scheme, netloc, parsed.path.rstrip("/"), "", "", ""))
    else:
        base = f"http://127.0.0.1:{port}"
        lines.append(
            f"  start the UI:  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {uri} "
            f"--host 127.0.0.1 --port {port} --workers 1"
        )
    lines.append(f"  runs:          {base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    if parent_id:
        lines.append(f"  parent run:    {base}/#/experiments/{experiment_id}/runs/{parent_id}")
    return "\n".join(lines)
