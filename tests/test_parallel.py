"""Several jobs at once (#19): `dept run --parallel N` gives the scores, summary and MLflow runs of a sequential
run; a `--join` worker (a second machine on the same file system) takes jobs of the same run, none twice; a worker
killed mid-job leaves the job to be resumed by another. Fast: the arithmetic of `auto` and the refusals."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import LAUNCHER_VARIABLES, REPO, run
from support import holds, logged_steps, raises_one_line, release

from pipeline import workers
from pipeline.recipe import load_recipe, plan

# stories260K (pretrained, shipped): two source stages side by side, then a transfer stage of two seeds.
RECIPE = """
name: par
model: stories260K
ds_config: zero3_cpu
output_dir: {out}
method: dept
dept: {{num_virtual_tokens: 4, r: 1, max_length: 96}}
train: {{batch_size: 8, steps: {steps}, warmup_steps: 2, log_every: 2, save_every: 5}}
data: {{eval_mode: generate, max_eval_rows: 8, max_new_tokens: 4}}
stages:
  - {{name: source, tasks: [stories-animal]}}
  - {{name: source-pt, method: pt, tasks: [stories-animal]}}
  - {{name: transfer, type: transfer, source: source, targets: [stories-had], k: [8], seeds: [1, 2],
      train: {{steps: 8}}}}
"""
TIMING = re.compile(r"(_s|per_s|seconds|_mb|memory)$")  # step time, tokens/s, peak memory: differ run to run
JOB_DIRS = ["source", "source-pt", "transfer/stories-had/k8/seed1/source", "transfer/stories-had/k8/seed2/source"]


def write_recipe(tmp_path: Path, name: str, steps: int = 10) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(RECIPE.format(out=tmp_path / name, steps=steps))
    return path


def start(args: list[str], env: dict | None = None) -> subprocess.Popen:
    """`dept ARGS` in the background, as a second machine's worker would be started."""
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        env={**inherited, "PYTHONUNBUFFERED": "1", **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    return out


def wait_for(path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.5)


def scores(out: Path) -> dict:
    """What must not depend on how the jobs were scheduled: each job's scores and curve, and the summary's tables."""
    jobs = {}
    for name in JOB_DIRS:
        result = json.loads((out / name / "results.json").read_text())
        jobs[name] = {
            "test": result.get("test"),
            "best_step": result.get("best_step"),
            "final_loss": result.get("final_loss"),
            "loss": [h.get("loss") for h in result.get("history", [])],
        }
    summary = json.loads((out / "summary.json").read_text())
    return {"jobs": jobs, "transfer": summary["transfer"], "sources": [s.get("test") for s in summary["sources"]]}


def mlflow_children(uri: str, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("dept.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {}
    for r in runs:
        if r.data.tags.get("dept.role") != "child":
            continue
        assert r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id and r.info.status == "FINISHED"
        params = {k: v for k, v in r.data.params.items() if not k.endswith(("output_dir", "init_adapter"))}
        metrics = {k: v for k, v in r.data.metrics.items() if not TIMING.search(k)}
        children[r.info.run_name] = (params, metrics)
    return children


def attempts(out: Path) -> dict[str, list[int]]:
    return {name: [a["pid"] for a in workers.attempts(out / name)] for name in JOB_DIRS}


# ----------------------------------------------------------------------------------------------- fast


def jobs_of(tmp_path, **changes):
    recipe = load_recipe(str(write_recipe(tmp_path, "plan")), changes)
    return plan(recipe)


def test_auto_divides_the_cores_by_the_threads_of_a_job(tmp_path):
    jobs = jobs_of(tmp_path)
    assert workers.independent(jobs) == 2  # the two source stages; then the two transfer seeds
    assert workers.threads_per_job(jobs, cores=2) == 1  # stories260K: one thread per job
    assert workers.worker_count("auto", jobs, world_size=1, cores=2, gpus=[]) == 2
    assert workers.worker_count("auto", jobs, world_size=1, cores=16, gpus=[]) == 2  # never more than can run
    assert workers.worker_count("auto", jobs, world_size=1, cores=1, gpus=[]) == 1
    threaded = jobs_of(tmp_path, **{"train.cpu_threads": 2})
    assert workers.worker_count("auto", threaded, world_size=1, cores=4, gpus=[]) == 2
    assert workers.worker_count("auto", threaded, world_size=1, cores=3, gpus=[]) == 1
    assert workers.worker_count("auto", jobs, world_size=1, cores=2, gpus=["0", "1", "2"]) == 2  # a GPU each
    assert workers.worker_count("auto", jobs, world_size=2, cores=2, gpus=[]) == 1  # under launch.sh: as before
    assert workers.worker_count(1, jobs, world_size=1, cores=2, gpus=[]) == 1
    assert workers.worker_count("4", jobs, world_size=1, cores=2, gpus=[]) == 2  # capped at the independent jobs


def test_a_large_or_unknown_backbone_takes_every_core(tmp_path):
    jobs = jobs_of(tmp_path, model="t5-base")
    assert workers.threads_per_job(jobs, cores=8) == 8
    assert workers.worker_count("auto", jobs, world_size=1, cores=8, gpus=[]) == 1


def test_each_worker_gets_its_share_and_its_own_world(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "0")
    env = workers.worker_env(1, 2, cores=8, gpus=["2", "5"])
    assert env["OMP_NUM_THREADS"] == "4" and env["CUDA_VISIBLE_DEVICES"] == "5"
    assert "MASTER_PORT" not in env and "RANK" not in env
    assert workers.worker_env(0, 4, cores=2, gpus=[])["OMP_NUM_THREADS"] == "1"


def test_refusals_name_the_combination(tmp_path):
    jobs = jobs_of(tmp_path)
    raises_one_line(
        "--parallel 'many': give a number of jobs at once",
        workers.worker_count,
        "many",
        jobs,
        world_size=1,
        cores=2,
        gpus=[],
    )
    raises_one_line("--parallel 0", workers.worker_count, 0, jobs, world_size=1, cores=2, gpus=[])
    raises_one_line(
        "--parallel 2 under a launch of 2 ranks", workers.worker_count, 2, jobs, world_size=2, cores=2, gpus=[]
    )
    raises_one_line(
        "--parallel 2 on a node with 1 GPU(s)", workers.worker_count, 2, jobs, world_size=1, cores=2, gpus=["0"]
    )


def test_the_quickstart_runs_its_jobs_in_parallel_by_default(capsys):
    recipe = load_recipe("quickstart")
    assert workers.worker_count(recipe.spec.parallel, plan(recipe), world_size=1, cores=2, gpus=[]) == 2
    from pipeline.runner import run_recipe

    run_recipe("quickstart", {"parallel": "1"}, dry_run=True)
    assert "jobs at once: 1 (--parallel 1," in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_parallel_and_joined_runs_give_the_scores_summary_and_mlflow_runs_of_a_sequential_run(tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    runs = {
        name: ["run", str(write_recipe(tmp_path, name)), f"--tracking.uri={db}", f"--tracking.experiment={name}"]
        for name in ("one", "two", "joined")
    }
    one = run([*runs["one"], "--parallel=1"])
    two = run([*runs["two"], "--parallel=2"])
    assert "running up to 2 jobs at once" in two.stdout and "jobs at once" not in one.stdout
    assert "[3/4] transfer seed=1 k=8 source stories-had: test accuracy" in two.stdout  # each job's line, named

    # a second machine: `--join` against the run the first launched (same output folder, same tracking store)
    launcher = start(runs["joined"])
    wait_for(tmp_path / "joined" / "source" / workers.WORKERS_LOG)  # the launcher has made the run
    joiner = start([*runs["joined"], "--join"])
    joined, launched = finish(joiner), finish(launcher)
    assert launcher.returncode == 0, launched[-3000:]
    assert joiner.returncode == 0, joined[-3000:]
    assert "the launcher writes the summary" in joined and "| stories-had |" in launched

    for name in ("two", "joined"):
        assert scores(tmp_path / name) == scores(tmp_path / "one"), name
        assert mlflow_children(db, name) == mlflow_children(db, "one"), name
    pids = {name: attempts(tmp_path / name) for name in ("two", "joined")}
    assert all(len(p) == 1 for each in pids.values() for p in each.values()), pids  # none ran twice
    assert len({p[0] for p in pids["two"].values()}) == 2  # the launcher's two workers shared the jobs
    assert {p[0] for p in pids["joined"].values()} == {launcher.pid, joiner.pid}  # split between the machines


@pytest.mark.slow
def test_a_killed_workers_job_is_resumed_by_another(tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    recipe = write_recipe(tmp_path, "killed", steps=20)
    out = tmp_path / "killed"
    args = ["run", str(recipe), f"--tracking.uri={db}", "--tracking.experiment=killed"]
    launcher = start([*args, "--stages.transfer.train.steps=20"])
    wait_for(out / "source" / workers.WORKERS_LOG)
    # Every job has 20 steps and a checkpoint every 5: the joiner's first job, whichever it is, is SIGKILLed at its
    # step 15; the launcher resumes it once the kernel has dropped the dead worker's lock.
    joiner = start([*args, "--stages.transfer.train.steps=20", "--join"], env={"DEPT_FAULT_KILL_AT_STEP": "15"})
    finish(joiner)
    assert joiner.returncode == -9
    launched = finish(launcher)
    assert launcher.returncode == 0, launched[-3000:]
    pids = attempts(out)
    killed = [name for name, p in pids.items() if p == [joiner.pid, launcher.pid]]
    assert len(killed) == 1, pids  # resumed by the launcher, after the kill
    assert all(p == [launcher.pid] for name, p in pids.items() if name not in killed), pids  # none ran twice
    assert "resumed from step 15" in (out / killed[0] / "job.log").read_text()
    children = mlflow_children(db, "killed")  # the killed job's run was re-attached and finished
    assert len(children) == len(JOB_DIRS)


@pytest.mark.slow
def test_a_failing_worker_stops_the_run_in_one_line_naming_its_log(tmp_path):
    recipe = write_recipe(tmp_path, "failing")
    args = ["run", str(recipe), "--parallel=2", "--tracking.enabled=false"]
    failed = run(args, env={"DEPT_FAULT_RAISE_AT_STEP": "3"}, check=False)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error")]
    assert failed.returncode == 2 and len(errors) == 1, failed.stderr[-3000:]
    assert "injected failure" in errors[0] and "workers/worker-" in errors[0] and "re-run the same command" in errors[0]
    for pids in attempts(tmp_path / "failing").values():  # no worker left behind
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)


@pytest.mark.slow
def test_ctrl_c_stops_every_worker_at_a_step_with_a_checkpoint_and_the_rerun_resumes(tmp_path):
    """#21 under `--parallel 2`: SIGINT to the run's process group (what Ctrl-C in a terminal does) stops both
    workers at a step boundary with a checkpoint and their one line, the run exits 130 and leaves no process, and the
    same command resumes both jobs and finishes the run."""
    import signal

    recipe = write_recipe(tmp_path, "ctrlc", steps=200)
    out = tmp_path / "ctrlc"
    args = ["run", str(recipe), "--parallel=2", "--tracking.enabled=false"]
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    launcher = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=REPO,
        env={**inherited, "PYTHONUNBUFFERED": "1", **holds(tmp_path, 10)},  # both wait after step 10 until released
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    sources = [out / "source", out / "source-pt"]

    deadline = time.monotonic() + 300
    # both past their first checkpoint (step 5), and neither past step 10 (held there)
    while not all(logged_steps(job / "metrics.jsonl") >= 4 for job in sources):
        assert launcher.poll() is None and time.monotonic() < deadline, "the source jobs did not start"
        time.sleep(0.2)
    os.killpg(launcher.pid, signal.SIGINT)
    release(tmp_path, 10)
    said = finish(launcher, timeout=120)
    assert launcher.returncode == 130, said[-3000:]
    stopped = {}
    for log in sorted((out / "workers").glob("worker-*.log")):
        lines = [line for line in log.read_text().splitlines() if line.startswith("interrupted at step ")]
        assert len(lines) == 1 and "checkpoint written" in lines[0], (log, lines)
        stopped[log.name] = int(lines[0].split()[3])
    assert len(stopped) == 2 and all(5 <= step < 200 for step in stopped.values()), stopped
    for pids in attempts(out).values():  # no worker left behind
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    resumed = run(args, timeout=900)
    assert "error" not in resumed.stderr.lower(), resumed.stderr[-3000:]
    for job in sources:
        assert "resumed from step" in (job / "job.log").read_text()
        history = json.loads((job / "results.json").read_text())["history"]
        assert [h["step"] for h in history] == list(range(2, 201, 2))
    assert (out / "summary.json").exists()
