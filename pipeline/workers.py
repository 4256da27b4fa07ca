"""Several jobs of a recipe at once: worker processes that each take the next job nobody runs. #19

    dept run quickstart --parallel 2                      # two worker processes, one core each (2-core machine)
    dept run RECIPE --parallel auto                       # the cores (or GPUs) divided by what one job needs
    dept run RECIPE --output_dir=/shared/run --join       # another machine takes jobs of the same run

A worker is a `dept run RECIPE --join` process with the launcher's overrides: its own torch.distributed/DeepSpeed
world, its share of the machine (CPU: OMP_NUM_THREADS = cores // workers; GPU node: whole GPUs through
CUDA_VISIBLE_DEVICES). It takes a job by holding the job folder's lock (`folder_lock.try_hold`): a held folder is
someone else's job; a finished one (results.json with the job's fingerprint) is reused. The kernel drops the lock
of a worker that dies, so the next worker that reaches the job resumes it from its last checkpoint. The launcher
keeps the plan, prints one line as each job starts and ends (`Progress`), and writes the summary once every job is
finished, by whichever worker. Each worker's own console output goes to `<output_dir>/workers/worker-<i>.log`;
each job's to its job.log. Who ran a job (pid, host, time) is appended to the job folder's `workers.log`.

Not supported (refused with one line): --parallel above 1 inside a multi-rank launch (./launch.sh, torchrun): each
worker is its own world; jobs that need several GPUs each (ZeRO-3 over a group) in parallel.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from pipeline import distributed
from pipeline.errors import PipelineError
from pipeline.recipe import Job

WORKERS_LOG = "workers.log"  # in each job folder: one line per attempt, which process ran it
SMALL_BACKBONE_BYTES = 400_000_000  # ~100M fp32 parameters: engine.ONE_THREAD_BELOW_PARAMS, from the weights' size


def requested(value: object) -> int | str:
    """The recipe's `parallel` (or --parallel): a positive count or "auto"; else a one-line error."""
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise PipelineError(f"--parallel {value!r}: give a number of jobs at once (1, 2, ...) or auto")


def independent(jobs: list[Job]) -> int:
    """The most jobs that can run side by side: jobs that wait for the same stages (none, or the same sources)."""
    groups: dict[tuple, int] = {}
    for job in jobs:
        key = (job.init_from_stage, job.model_from_stage)
        groups[key] = groups.get(key, 0) + 1
    return max(groups.values(), default=0)


def threads_per_job(jobs: list[Job], cores: int) -> int:
    """CPU threads one job uses: its `train.cpu_threads`; else 1 for a small backbone (engine.cpu_threads' rule),
    else every core (a large backbone's ops split over them: one job at a time)."""
    asked = [j.config.train.cpu_threads for j in jobs if j.config.train.cpu_threads]
    if asked:
        return max(asked)
    return 1 if all(_small_backbone(j.config.model) for j in jobs) else cores


def _small_backbone(model: str) -> bool:
    from pipeline.resources import model_location

    if model.startswith("random:"):
        return "tiny" in model
    folder = Path(model_location(model)).expanduser()
    if not folder.is_dir():
        return False  # a hub name: sized only once loaded, so assume large
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
    return bool(weights) and sum(p.stat().st_size for p in weights) < SMALL_BACKBONE_BYTES


def gpus_visible() -> list[str]:
    """The GPUs this process may use (their CUDA_VISIBLE_DEVICES names), [] on a CPU machine."""
    from pipeline.resources import gpu_visible

    if not gpu_visible():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip():
        return [d.strip() for d in listed.split(",") if d.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def worker_count(value: object, jobs: list[Job], world_size: int, cores: int, gpus: list[str]) -> int:
    """How many worker processes to start: 1 means the launcher runs the jobs itself."""
    asked = requested(value)
    if asked == 1:
        return 1
    if world_size > 1:
        if asked == "auto":
            return 1
        raise PipelineError(
            f"--parallel {asked} under a launch of {world_size} ranks: each parallel worker is its own "
            "distributed world; run `dept run RECIPE --parallel N` without ./launch.sh (or torchrun), or keep the "
            "ranks and drop --parallel"
        )
    width = independent(jobs)
    if asked == "auto":
        machine = len(gpus) if gpus else max(1, cores // threads_per_job(jobs, cores))
        return max(1, min(machine, width))
    if gpus and asked > len(gpus):
        raise PipelineError(
            f"--parallel {asked} on a node with {len(gpus)} GPU(s): each worker takes a whole GPU; use "
            f"--parallel {len(gpus)} or --parallel auto"
        )
    return max(1, min(asked, width))


def worker_env(index: int, count: int, cores: int, gpus: list[str]) -> dict[str, str]:
    """Worker `index` of `count`: its share of the machine, and no launcher variables (its own world)."""
    env = {k: v for k, v in os.environ.items() if k not in distributed.LAUNCHER_VARIABLES}
    env["OMP_NUM_THREADS"] = str(max(1, cores // count))
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    return env


def record_attempt(job_dir: Path) -> None:
    """Append who runs the job now to its workers.log (the evidence of who ran what, and of resumes)."""
    line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": round(time.time(), 3)})
    with open(Path(job_dir) / WORKERS_LOG, "a") as handle:
        handle.write(line + "\n")


def attempts(job_dir: Path) -> list[dict]:
    path = Path(job_dir) / WORKERS_LOG
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class Pool:
    """The launcher's worker processes (`dept run RECIPE --join ...`), each logging to workers/worker-<i>.log."""

    def __init__(self, recipe: str, overrides: dict, rerun_changed: bool, out: Path, count: int, cores: int):
        gpus = gpus_visible()
        folder = out / "workers"
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pipeline.cli", "run", recipe, "--join"]
        command += ["--rerun_changed"] if rerun_changed else []
        command += [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]
        self.logs = [folder / f"worker-{i}.log" for i in range(count)]
        self.procs = []
        for i, path in enumerate(self.logs):
            with open(path, "w") as log_file:
                self.procs.append(
                    subprocess.Popen(
                        command,
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        env=worker_env(i, count, cores, gpus),
                    )
                )

    def failed(self) -> tuple[int, str] | None:
        """(worker index, its last error line) of a worker that exited non-zero, else None."""
        for i, proc in enumerate(self.procs):
            if proc.poll() not in (None, 0):
                lines = [ln for ln in self.logs[i].read_text(errors="replace").splitlines() if ln.strip()]
                errors = [ln for ln in lines if "error" in ln.lower()]
                return i, (errors or lines or ["(no output)"])[-1].strip()
        return None

    def running(self) -> bool:
        return any(proc.poll() is None for proc in self.procs)

    def stop(self) -> None:
        """End the workers (an error elsewhere, Ctrl-C): their jobs keep their checkpoints for a resume."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
