"""`dept run RECIPE`: execute a recipe's jobs, tracked in MLflow, and aggregate the results.

    dept run quickstart                                   # a shipped recipe by name, one process
    ./launch.sh run quickstart --output_dir=runs/qs-2     # every local rank (2 CPU ranks without GPUs)
    dept run recipes/fewshot_small.yaml --dry_run         # validate, check feasibility, print the plan

Reads top to bottom: load + validate -> plan -> feasibility -> what each job's folder holds (finished with the same
fingerprint: reuse; unfinished with the same fingerprint: resume; anything else: refuse, or with --rerun_changed
start over) -> tracking checked -> parent run -> each job in its child run -> summary.json, summary.md,
summary.png, printed table and where to look in the MLflow UI.

What MLflow shows is decided in mlflow_record.py (names, params, tags, lineage, notes) and sent by
tracking.Tracker (rank 0 logs); this module only says when. Each job draws its own curves.png (job.py).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline import atomic, distributed, logs, sweep
from pipeline import mlflow_record as shown
from pipeline.errors import PipelineError
from pipeline.fingerprint import job_fingerprint, recorded_state
from pipeline.plots import draw
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
        # a swept stage's result is its winner, known once it ran: its dependents are checked again then (run_recipe)
        if state.action in ("rerun", "start") and state.job.meta["type"] == "train" and not sweep.is_trial(job):
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
    jobs = plan(recipe, persist=not dry_run)
    check_feasible(recipe, jobs)
    if dry_run:
        print(describe_plan(recipe, jobs))
        return None
    from pipeline import engine
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
    recipe_key = shown.recipe_key(recipe)
    names = shown.run_names(jobs)
    with tracker:
        parent = tracker.parent(recipe.name, recipe_key)
        tracker.describe_experiment(recipe.spec.description)
        tracker.set_tags(shown.parent_tags(recipe, jobs, world), run_id=parent)
        results: dict[str, dict] = {}
        run_ids: dict[str, str | None] = {}
        progress = Progress(jobs, names, enabled=rank == 0)
        sweeps = sweep.Sweeps(recipe, rank)
        for state in states:
            job = state.job
            if job.init_from_stage in sweeps.sweeps:  # its source adapter is the sweep's winner, chosen just now
                state = job_state(job, False)
                if not rerun_changed:
                    refuse_changed([state])
            lineage = shown.lineage_tags(job, jobs, run_ids) if tracker.active else {}
            progress.starts(state)
            hooks = sweeps.hooks(job, state.action)
            runs = functools.partial(run_job, should_stop=hooks.should_stop) if hooks else run_job
            with logs.one_line_per_job():
                result, run_id = _execute(state, tracker, recipe_key, runs, names[job.key], lineage)
            results[job.key], run_ids[job.key] = result, run_id
            sweeps.finished(job, result, hooks)
            progress.ends(state, result)
            if sweeps.last_trial(job, jobs):
                progress.winner(sweeps.stage_done(job.stage, jobs, results))
            gc.collect()
        from pipeline._version import __version__

        run = {
            "jobs": len(jobs),
            "reused": sum(s.action == "reuse" for s in states),
            "world_size": world,
            "seconds": round(time.time() - started, 1),
            "version": __version__,
        }
        summary = summarize(recipe.name, jobs, results, run, recipe.spec.compare_methods)
        if rank == 0:
            atomic.write_json(out / "summary.json", summary)
            atomic.write_text(out / "summary.md", summary["markdown"])
            print(summary["markdown"])
            print(
                f"summary: {out / 'summary.md'}, {out / 'summary.json'}, {out / 'summary.png'}; each job's "
                f"results.json and job.log in its folder under {out}"
            )
            from pipeline.plots import plot_summary

            winners = {row["stage"]: row["key"] for row in summary["sources"]}
            train_results = {j.stage: results[j.key] for j in jobs if winners.get(j.stage) == j.key}
            draw(plot_summary, summary, train_results, out / "summary.png")
            if summary["sweeps"]:
                from pipeline.plots import plot_sweeps

                draw(plot_sweeps, summary["sweeps"], out / "sweep.png")
            if summary["methods"]:
                from pipeline.plots import plot_methods
                from pipeline.summary import methods_file

                atomic.write_text(out / "methods.md", methods_file(summary))
                draw(plot_methods, summary, out / "methods.png")
            tracker.log_metrics(aggregates(summary), step=0, run_id=parent)
            tracker.set_tags({"mlflow.note.content": shown.parent_note(recipe, jobs, summary)}, run_id=parent)
            tracker.set_tags(shown.sweep_tags(summary), run_id=parent)
            for name in (
                "recipe.resolved.yaml",
                "summary.json",
                "summary.md",
                "summary.png",
                "sweep.png",
                "methods.md",
                "methods.png",
            ):
                if (out / name).exists():
                    tracker.log_artifact(out / name, run_id=parent)
        tracker.finish(parent)
        if rank == 0 and uri:
            print(shown.ui_hint(uri, tracker.experiment_id, parent))
    distributed.barrier()
    return summary


class Progress:
    """The console's story of a recipe (rank 0, stdout): one line as each job starts and as it ends, with its
    score and time, and the time left in its stage from the mean of the stage's jobs run so far. #22

        [12/38] transfer k=8 seed=1 source stories-had: started (stage transfer: about 3 min left)
        [12/38] transfer k=8 seed=1 source stories-had: test accuracy 45.0, 12 s
    """

    def __init__(self, jobs: list[Job], names: dict[str, str], enabled: bool):
        self.jobs, self.names, self.enabled = jobs, names, enabled
        self.durations: dict[str, list[float]] = {}
        self.index, self.started = 0, 0.0

    def _label(self, job: Job) -> str:
        name = self.names[job.key]
        shown = name if name.startswith(f"{job.stage}:") else f"{job.stage} {name}"
        return f"[{self.index}/{len(self.jobs)}] {shown}"

    def starts(self, state: JobState) -> None:
        self.index += 1
        self.started = time.time()
        if not self.enabled or state.action == "reuse":
            return
        job = state.job
        left = [j for j in self.jobs[self.index - 1 :] if j.stage == job.stage]
        done = self.durations.get(job.stage)
        eta = f" (stage {job.stage}: about {_duration(len(left) * sum(done) / len(done))} left)" if done else ""
        verb = {"resume": "resumed", "rerun": "started over"}.get(state.action, "started")
        print(f"{self._label(job)}: {verb}{eta}", flush=True)

    def ends(self, state: JobState, result: dict) -> None:
        seconds = time.time() - self.started
        if state.action != "reuse":
            self.durations.setdefault(state.job.stage, []).append(seconds)
        if not self.enabled:
            return
        outcome = _outcome(result)
        if sweep.is_trial(state.job):  # a sweep's trials are compared on validation
            outcome = f"{_validation(result)}; {outcome}"
        when = "reused" if state.action == "reuse" else _duration(seconds)
        print(f"{self._label(state.job)}: {outcome}, {when}", flush=True)

    def winner(self, best: dict | None) -> None:
        """A swept stage's winner, once its last trial ended."""
        if not self.enabled or not best:
            return
        test = best.get("test_score")
        print(
            f"{best['stage']}: best trial {best['setting']} (validation {best['best_validation']:.1f} at step "
            f"{best['best_step']}{f', test {test:.1f}' if isinstance(test, (int, float)) else ''}); later stages "
            f"start from its adapter",
            flush=True,
        )


def _validation(result: dict) -> str:
    score, stopped = result.get("best_validation"), result.get("stopped_early")
    text = f"best validation {score:.1f} at step {result.get('best_step')}" if isinstance(score, (int, float)) else ""
    if stopped:
        return f"pruned at step {stopped['step']}" + (f" ({text})" if text else "")
    return text or "no validation score"


def _outcome(result: dict) -> str:
    score, metric = result.get("test_score"), result.get("reported_metric")
    if isinstance(score, (int, float)):
        return f"test {metric if metric and ' ' not in metric else 'score'} {score:.1f}"
    loss = result.get("final_loss")
    return f"final loss {loss:.4f}" if isinstance(loss, (int, float)) else "done"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _execute(
    state: JobState, tracker, recipe_key: str, run_job, name: str, lineage: dict[str, str]
) -> tuple[dict, str | None]:
    """Run (or reuse) one job inside its MLflow child run: (its results, the child run's id)."""
    from pipeline.job import draw_curves

    job = state.job
    out = Path(job.config.output_dir)
    results_file = out / "results.json"
    if state.action == "rerun" and distributed.rank() == 0:
        log.info("%s: settings changed (%s): starting it over", job.key, ", ".join(state.changed_keys[:4]))
        shutil.rmtree(out)
    distributed.barrier()
    digest, _ = job_fingerprint(job.config)  # the init adapter exists now
    child_key = shown.child_key(recipe_key, job, digest)
    tags = {**shown.job_tags(job, digest, distributed.world_size()), **lineage}
    title = f"{name} ({job.stage})"
    if state.action == "reuse" and results_file.exists():
        if distributed.rank() == 0:
            log.info("%s: finished earlier with the same settings, reusing %s", job.key, results_file)
        result = json.loads(results_file.read_text())
        if distributed.rank() == 0 and not (out / "curves.png").exists():  # finished before jobs drew their own
            draw_curves(result, title, out)
        if tracker.is_finished(child_key):
            return result, tracker.run_id_for(child_key)
        # crashed between results.json and closing the child run: log what the run is missing, then close it
        child = tracker.child(name, child_key, shown.job_params(job))
        tracker.set_tags(tags, run_id=child)
        if distributed.rank() == 0:
            _log_outcome(tracker, job, child, result)
        tracker.finish(child)
        return result, child
    if job.config.init_adapter and not Path(job.config.init_adapter).exists():
        raise PipelineError(
            f"{job.key}: the source adapter {job.config.init_adapter} does not exist; did its stage "
            "finish? run the recipe from the start"
        )
    child = tracker.child(name, child_key, shown.job_params(job))
    tracker.set_tags(tags, run_id=child)
    callback = tracker.callback_for(child, invalid_curves=job.config.data.eval_mode == "generate")
    result = run_job(
        job.config,
        callbacks=[callback],
        on_data=lambda data, context, rows: tracker.log_dataset(rows, data, context, run_id=child),
        title=title,
    )
    if distributed.rank() == 0:
        _log_outcome(tracker, job, child, result)
    tracker.finish(child)
    return result, child


def _log_outcome(tracker, job: Job, run_id: str | None, result: dict) -> None:
    """Rank 0, after a job: what `mlflow_record.outcome` lists, sent to the job's run (`run_id`)."""
    if run_id is None:
        return
    record = shown.outcome(job, result, run_id)
    try:
        tracker.log_params(record.params, run_id=run_id)
    except PipelineError as exc:  # a job re-attached with another resolved shape: keep the run, say so
        log.warning("%s: %s", job.key, exc)
    tracker.log_metrics(record.metrics, step=record.step, run_id=run_id)
    for path in record.artifacts:
        tracker.log_artifact(path, run_id=run_id)
    tracker.set_tags(record.tags, run_id=run_id)
