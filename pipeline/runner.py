"""`dept run RECIPE`: execute a recipe's jobs, tracked in MLflow, and aggregate the results.

    dept run quickstart                                   # a shipped recipe by name, one process
    ./launch.sh run quickstart --output_dir=runs/qs-2     # every local rank (2 CPU ranks without GPUs)
    dept run recipes/fewshot_small.yaml --dry_run         # validate, check feasibility, print the plan
    dept run quickstart --parallel 2                      # two jobs at once, each in its own worker process
    dept run RECIPE --output_dir=/shared/x --join         # a worker (another machine) of a run launched there

Reads top to bottom: load + validate -> plan -> feasibility -> what each job's folder holds (finished with the same
fingerprint: reuse; unfinished with the same fingerprint: resume; anything else: refuse, or with --rerun_changed
start over) -> tracking checked -> parent run -> each job in its child run -> summary.json, summary.md,
summary.png, printed table and where to look in the MLflow UI.

Who runs a job (#19): whoever holds its folder's lock (`folder_lock.try_hold(job folder)`, taken in `_choose`). The
launcher (a plain `dept run`) runs jobs itself (`_work`) or, with `--parallel N` above 1, starts N workers
(workers.Pool: `dept run RECIPE --join` processes) and prints their progress (`_watch`). A `--join` process opens
no parent run of its own (`Tracker.join_parent`), runs jobs nobody holds until every job is finished, and writes
no summary; so a second `dept run` on the same output_dir must be refused unless it passes `--join` (the
launcher's own lock on the output_dir is #21's). Jobs start once the stages they start from
(`init_from_stage`, `model_from_stage`) are finished; independent stages overlap. A worker killed mid-job drops its
lock with its process: the next worker to reach the job resumes it from the checkpoint.

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
        # a swept stage's result is its winner, known once it ran: its dependents are checked again then (_choose)
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
    name_or_path: str,
    overrides: dict | None = None,
    dry_run: bool = False,
    rerun_changed: bool = False,
    join: bool = False,
) -> dict | None:
    """Run a recipe's jobs and write its summary (None for --dry_run and for a --join worker, which only runs
    jobs: the launcher writes the summary)."""
    recipe = load_recipe(name_or_path, overrides)
    jobs = plan(recipe, persist=not dry_run)
    check_feasible(recipe, jobs)
    from pipeline import workers

    if dry_run:
        print(describe_plan(recipe, jobs))
        cores, world = len(os.sched_getaffinity(0)), distributed.world_size()
        count = workers.worker_count(recipe.spec.parallel, jobs, world, cores, workers.gpus_visible())
        print(f"jobs at once: {count} (--parallel {recipe.spec.parallel}, {cores} cores, world size {world})")
        return None
    from pipeline import engine
    from pipeline.tracking import Tracker, check_reachable

    uri = tracking_uri(recipe)
    if uri:
        check_reachable(uri)  # before any training: a wrong URI fails now, not after hours
    states = job_states(jobs)
    if not rerun_changed:
        refuse_changed(states)
    started = time.time()
    rank, world = engine.init_distributed(float(jobs[0].config.train.comm_timeout_s))
    cores = len(os.sched_getaffinity(0))
    to_run = [s.job for s in states if s.action != "reuse"]
    count = 1 if join else workers.worker_count(recipe.spec.parallel, to_run, world, cores, workers.gpus_visible())
    out = recipe.output_dir
    if rank == 0 and not join:
        print(describe_plan(recipe, jobs))
        if count > 1:
            print(f"running up to {count} jobs at once, each in its own worker process (logs: {out / 'workers'})")
        atomic.write_text(out / "recipe.resolved.yaml", yaml.safe_dump(resolved_dict(recipe), sort_keys=False))
    experiment = recipe.spec.tracking.experiment or f"dept-{recipe.name}"
    tracker = Tracker(uri, experiment, enabled=bool(uri))
    recipe_key = shown.recipe_key(recipe)
    names = shown.run_names(jobs)
    with tracker:
        if join:
            parent = tracker.join_parent(recipe_key)
        else:
            parent = tracker.parent(recipe.name, recipe_key)
            tracker.send_pending(out)  # records kept while the tracking server did not answer last time (#21)
            tracker.describe_experiment(recipe.spec.description)
            tracker.set_tags(shown.parent_tags(recipe, jobs, world), run_id=parent)
        progress = Progress(jobs, names, enabled=rank == 0, at_once=count)
        sweeps = sweep.Sweeps(recipe, rank)
        reused = {s.job.key for s in states if s.action == "reuse"}
        if count > 1:
            pool = workers.Pool(name_or_path, overrides or {}, rerun_changed, out, count, cores)
            try:
                _watch(pool, jobs, reused, progress)
            except BaseException:
                pool.stop()
                raise
        else:
            _work(jobs, reused, tracker, recipe_key, names, progress, rerun_changed, sweeps)
        if join:
            if rank == 0:
                print(f"every job of {out} is finished; the launcher writes the summary")
            return None
        results: dict[str, dict] = {}
        for job in jobs:
            results[job.key], _ = _reuse(job, tracker, recipe_key, names[job.key], say=False)
            sweeps.finished(job, results[job.key], None)  # a trial the study does not hold finished: recorded
        for stage in sweeps.sweeps:
            best = sweeps.stage_done(stage, jobs, results)
            if stage not in progress.winners:
                progress.winner(best)
        from pipeline._version import __version__

        run = {
            "jobs": len(jobs),
            "reused": len(reused),
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
    score and time, and the time left in its stage from the mean of the stage's jobs run so far. #22 With several
    jobs at once (#19) the lines of different jobs interleave; each names its job and its place in the plan, and
    says which worker runs it.

        [12/38] transfer k=8 seed=1 source stories-had: started (stage transfer: about 3 min left)
        [12/38] transfer k=8 seed=1 source stories-had: test accuracy 45.0, 12 s
    """

    def __init__(self, jobs: list[Job], names: dict[str, str], enabled: bool, at_once: int = 1):
        self.jobs, self.names, self.enabled = jobs, names, enabled
        self.at_once = max(1, at_once)  # jobs running side by side: the stage's time left is shared between them
        self.durations: dict[str, list[float]] = {}
        self.started: dict[str, float] = {}
        self.ended: set[str] = set()
        self.winners: set[str] = set()

    def _label(self, job: Job) -> str:
        name = self.names[job.key]
        shown = name if name.startswith(f"{job.stage}:") else f"{job.stage} {name}"
        return f"[{self.jobs.index(job) + 1}/{len(self.jobs)}] {shown}"

    def starts(self, state: JobState, by: str = "") -> None:
        job = state.job
        self.started[job.key] = time.time()
        if not self.enabled or state.action == "reuse":
            return
        left = [j for j in self.jobs if j.stage == job.stage and j.key not in self.ended]
        done = self.durations.get(job.stage)
        seconds = len(left) * sum(done) / len(done) / min(self.at_once, len(left)) if done else 0.0
        eta = f" (stage {job.stage}: about {_duration(seconds)} left)" if done else ""
        verb = {"resume": "resumed", "rerun": "started over"}.get(state.action, "started")
        print(f"{self._label(job)}: {verb}{by}{eta}", flush=True)

    def ends(self, state: JobState, result: dict, by: str = "") -> None:
        key = state.job.key
        self.ended.add(key)
        seconds = time.time() - self.started[key] if key in self.started else None
        if state.action != "reuse" and seconds is not None:
            self.durations.setdefault(state.job.stage, []).append(seconds)
        if not self.enabled:
            return
        outcome = _outcome(result)
        if sweep.is_trial(state.job):  # a sweep's trials are compared on validation
            outcome = f"{_validation(result)}; {outcome}"
        when = "reused" if state.action == "reuse" else (_duration(seconds) if seconds is not None else "finished")
        print(f"{self._label(state.job)}: {outcome}, {when}{by}", flush=True)

    def winner(self, best: dict | None) -> None:
        """A swept stage's winner, once its last trial ended."""
        if not best:
            return
        self.winners.add(best["stage"])
        if not self.enabled:
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


def _work(
    jobs: list[Job],
    reused: set[str],
    tracker,
    recipe_key: str,
    names: dict[str, str],
    progress: Progress,
    rerun_changed: bool,
    sweeps: sweep.Sweeps,
) -> None:
    """Run jobs in this process until every job of the plan is finished, by this process or by others (`--join`
    workers, the launcher's worker pool): take the first job, in plan order, whose stages it depends on are
    finished and whose folder nobody holds; wait while the rest are held. All ranks take part; rank 0 chooses."""
    from pipeline import workers
    from pipeline.job import run_job

    by_key = {job.key: job for job in jobs}
    finished: set[str] = set()
    held: dict = {}  # rank 0: the folder lock of the job this process runs
    decided: set[str] = set()  # rank 0: swept stages whose winner this process has chosen (or confirmed)
    run_ids: dict[str, str | None] = {}
    while True:
        kind, key, action, newly, winners = distributed.decided_on_rank0(
            lambda: _choose(jobs, finished, held, rerun_changed, sweeps, decided), what="choosing the next job"
        )
        for done in newly:  # finished before this run (reused), or by another worker
            job = by_key[done]
            result = json.loads((Path(job.config.output_dir) / "results.json").read_text())
            others = [a for a in workers.attempts(job.config.output_dir) if a["pid"] != os.getpid()]
            by = f" (by pid {others[-1]['pid']} on {others[-1]['host']})" if others and done not in reused else ""
            state = JobState(job, "reuse" if done in reused else "start", [])
            progress.ends(state, result, by)
        for best in winners:
            progress.winner(best)
        if kind == "done":
            return
        if kind == "wait":
            time.sleep(2)
            continue
        job = by_key[key]
        state = JobState(job, action, [])
        sources = _source_run_ids(job, jobs, tracker, recipe_key, run_ids)
        lineage = shown.lineage_tags(job, jobs, sources) if tracker.active else {}
        progress.starts(state)
        hooks = sweeps.hooks(job, action)
        runs = functools.partial(run_job, should_stop=hooks.should_stop) if hooks else run_job
        try:
            with logs.one_line_per_job():
                result, run_ids[key] = _execute(state, tracker, recipe_key, runs, names[key], lineage)
            sweeps.finished(job, result, hooks)
        finally:
            claim = held.pop(key, None)
            if claim is not None:
                claim.release()
        finished.add(key)
        progress.ends(state, result)
        gc.collect()


def _choose(
    jobs: list[Job], finished: set[str], held: dict, rerun_changed: bool, sweeps: sweep.Sweeps, decided: set[str]
) -> tuple:
    """Rank 0: ("run", key, action, newly finished keys, winners) with the job's folder lock in `held`, or ("wait" |
    "done", None, None, newly finished keys, winners). A job counts as finished only once the stages it starts from
    are: a source stage that re-runs changes its transfer jobs' fingerprints; a swept stage's winner (best.json,
    best_adapter: its dependents' init adapter) is chosen once all its trials are finished, before they are looked
    at. `winners`: the best.json of swept stages decided in this call."""
    from pipeline import folder_lock, workers

    newly: list[str] = []
    winners: list[dict] = []
    unfinished_stages: set[str] = set()
    ready: list[Job] = []
    for job in jobs:
        if job.key in finished:
            continue
        if {job.init_from_stage, job.model_from_stage} & unfinished_stages:
            unfinished_stages.add(job.stage)
            continue
        if job.init_from_stage in sweeps.sweeps and job.init_from_stage not in decided:
            winners.append(_decide_winner(job.init_from_stage, jobs, sweeps))
            decided.add(job.init_from_stage)
        if recorded_state(job.config)[0] == "finished":
            finished.add(job.key)
            newly.append(job.key)
            continue
        unfinished_stages.add(job.stage)
        ready.append(job)
    for job in ready:
        claim = folder_lock.try_hold(job.config.output_dir, f"dept run, job {job.key}")
        if claim is None:
            continue  # another worker runs it
        state, changed = recorded_state(job.config)
        if state == "finished":  # finished by another worker between the two looks
            claim.release()
            finished.add(job.key)
            newly.append(job.key)
            continue
        if state == "changed" and not rerun_changed:
            claim.release()
            refuse_changed([JobState(job, "rerun", changed)])
        held[job.key] = claim
        workers.record_attempt(job.config.output_dir)
        action = {"new": "start", "resumable": "resume", "changed": "rerun"}[state]
        return "run", job.key, action, newly, winners
    return ("done" if len(finished) == len(jobs) else "wait"), None, None, newly, winners


def _decide_winner(stage: str, jobs: list[Job], sweeps: sweep.Sweeps) -> dict:
    """Rank 0: a swept stage's winner (`sweep.finish_stage`: best.json, best_adapter) once its trials are finished,
    under the stage folder's lock (several workers may get here at once; the result is the same)."""
    from pipeline import folder_lock

    trials = [j for j in jobs if j.stage == stage]
    results = {j.key: json.loads((Path(j.config.output_dir) / "results.json").read_text()) for j in trials}
    stage_dir = sweeps.recipe.output_dir / stage
    while (claim := folder_lock.try_hold(stage_dir, f"choosing the winner of {stage}")) is None:
        time.sleep(0.5)
    try:
        best = sweep.finish_stage(stage, trials, results, stage_dir)
    finally:
        claim.release()
    return best


def _source_run_ids(job: Job, jobs: list[Job], tracker, recipe_key: str, known: dict) -> dict[str, str | None]:
    """The MLflow run ids of the jobs `job` starts from (lineage tags), found by their keys when another worker ran
    them. Every rank calls it (the lookups are collectives)."""
    ids = dict(known)
    for source in jobs:
        if source.stage in (job.init_from_stage, job.model_from_stage) and source.key not in ids:
            digest, _ = job_fingerprint(source.config)
            ids[source.key] = tracker.run_id_for(shown.child_key(recipe_key, source, digest))
    return ids


def _watch(pool, jobs: list[Job], reused: set[str], progress: Progress) -> None:
    """The launcher while its worker pool runs the jobs: a line as each job starts and ends (from the job
    folders: workers.log and results.json), until the workers exit; the first worker that fails stops the rest."""
    from pipeline import workers

    seen = {job.key: len(workers.attempts(job.config.output_dir)) for job in jobs}
    since = time.time()
    for job in jobs:
        if job.key in reused:
            progress.starts(JobState(job, "reuse", []))
            progress.ends(
                JobState(job, "reuse", []), json.loads((Path(job.config.output_dir) / "results.json").read_text())
            )

    def look() -> None:
        for job in jobs:
            if job.key in progress.ended:
                continue
            out = Path(job.config.output_dir)
            tries = workers.attempts(out)
            if len(tries) > seen[job.key]:
                seen[job.key] = len(tries)
                who = f" (worker pid {tries[-1]['pid']})"
                resumed = (out / "checkpoints" / "latest").is_file()
                progress.starts(JobState(job, "resume" if resumed else "start", []), who)
            results = out / "results.json"
            if tries and results.exists() and results.stat().st_mtime >= since:
                try:
                    result = json.loads(results.read_text())
                except json.JSONDecodeError:  # atomic writes make this rare: read it next time
                    continue
                progress.ends(JobState(job, "start", []), result, f" (worker pid {tries[-1]['pid']})")

    while pool.running():
        look()
        failure = pool.failed()
        if failure:
            index, line = failure
            raise PipelineError(
                f"worker {index} failed: {line} (its log: {pool.logs[index]}); the other workers were stopped, re-run the same command to resume"
            )
        time.sleep(1)
    look()
    failure = pool.failed()
    if failure:
        index, line = failure
        raise PipelineError(
            f"worker {index} failed: {line} (its log: {pool.logs[index]}); re-run the same command to resume"
        )
    left = [job.key for job in jobs if job.key not in progress.ended and recorded_state(job.config)[0] != "finished"]
    if left:
        raise PipelineError(
            f"the workers exited with {len(left)} job(s) unfinished ({left[0]}, ...): see {pool.logs[0].parent}; re-run the same command to resume"
        )


def _clear(out: Path) -> None:
    """Empty a job folder to start the job over, keeping its lock (held by this process) and workers.log."""
    from pipeline import folder_lock, workers

    for path in out.iterdir():
        if path.name in (folder_lock.LOCK_NAME, workers.WORKERS_LOG):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _reuse(job: Job, tracker, recipe_key: str, name: str, say: bool = True) -> tuple[dict, str | None]:
    """A finished job's results and child run id; a child run left open (a crash between results.json and
    closing it) gets what it is missing and is closed."""
    from pipeline.job import draw_curves

    out = Path(job.config.output_dir)
    digest, _ = job_fingerprint(job.config)
    child_key = shown.child_key(recipe_key, job, digest)
    tags = shown.job_tags(job, digest, distributed.world_size())
    if say and distributed.rank() == 0:
        log.info("%s: finished earlier with the same settings, reusing %s", job.key, out / "results.json")
    result = json.loads((out / "results.json").read_text())
    if distributed.rank() == 0 and not (out / "curves.png").exists():  # finished before jobs drew their own
        draw_curves(result, f"{name} ({job.stage})", out)
    if tracker.is_finished(child_key):
        return result, tracker.run_id_for(child_key)
    child = tracker.child(name, child_key, shown.job_params(job))
    if child is None:  # tracking off, or its server does not answer
        return result, None
    tracker.set_tags(tags, run_id=child)
    if distributed.rank() == 0:
        # a job that ran while the tracking server did not answer has no curves there yet: from its results
        # (points the run already holds are skipped, so a re-attached run gets only what it lacks)
        replay = tracker.callback_for(child, invalid_curves=job.config.data.eval_mode == "generate")
        for step, record in shown.logged_records(result):
            replay(step, record)
        _log_outcome(tracker, job, child, result)
    tracker.finish(child)
    return result, child


def _execute(
    state: JobState, tracker, recipe_key: str, run_job, name: str, lineage: dict[str, str]
) -> tuple[dict, str | None]:
    """Run (or reuse) one job inside its MLflow child run: (its results, the child run's id)."""
    job = state.job
    out = Path(job.config.output_dir)
    if state.action == "rerun" and distributed.rank() == 0:
        log.info("%s: settings changed (%s): starting it over", job.key, ", ".join(state.changed_keys[:4]))
        _clear(out)
    distributed.barrier()
    if state.action == "reuse" and (out / "results.json").exists():
        return _reuse(job, tracker, recipe_key, name)
    digest, _ = job_fingerprint(job.config)  # the init adapter exists now
    child_key = shown.child_key(recipe_key, job, digest)
    tags = {**shown.job_tags(job, digest, distributed.world_size()), **lineage}
    title = f"{name} ({job.stage})"
    if job.config.init_adapter and not Path(job.config.init_adapter).exists():
        raise PipelineError(
            f"{job.key}: the source adapter {job.config.init_adapter} does not exist; did its stage "
            "finish? run the recipe from the start"
        )
    child = tracker.child(name, child_key, shown.job_params(job))
    if child is None:  # tracking off, or its server does not answer: no run to log to (None means the parent)
        return run_job(job.config, callbacks=[], on_data=None, title=title), None
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
