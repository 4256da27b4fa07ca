"""Preemption from outside, as schedulers and users do it: SIGTERM to one rank of a 2-rank job (the others follow
at the same step), SIGTERM to a recipe (its MLflow run KILLED, then continued by the re-run with one value per
step), SIGKILL after a default job's first time-based checkpoint, a second launch on a running job's folder, a real
file system that fills up mid-run. #21"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import LAUNCHER_VARIABLES, REPO, free_port, read_results, run
from support import held_at, holds, logged_steps, release
from test_reliability import args as tiny_job  # the same tiny T5 job (with dropout) the reliability tests run

from pipeline.adapters import read_adapter

pytestmark = pytest.mark.slow


def start(args: list[str], tmp_path: Path, nproc: int = 1, env: dict | None = None) -> subprocess.Popen:
    """`dept ARGS` in the background (its own session, as a scheduler's job), output in tmp_path/out.txt."""
    full_env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    full_env.update(MASTER_PORT=str(free_port()), PYTHONUNBUFFERED="1", **(env or {}))
    if nproc > 1:
        full_env.update(NPROC=str(nproc), LAUNCHER="deepspeed", OMP_NUM_THREADS="1")
        cmd = [str(REPO / "launch.sh"), *args]
    else:
        cmd = [sys.executable, "-m", "pipeline.cli", *args]
    log = open(tmp_path / "out.txt", "w")
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited {proc.returncode} before the fault could be injected"
        assert time.monotonic() < deadline, "timed out waiting to inject the fault"
        time.sleep(0.05)


def finish(proc: subprocess.Popen, grace: float) -> float:
    """Seconds until the whole job (every process of its session) is gone, failing past `grace`."""
    started = time.monotonic()
    try:
        proc.wait(timeout=grace)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return time.monotonic() - started


def interrupted_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("interrupted ")]


def test_sigterm_to_one_rank_of_a_2_rank_job_stops_every_rank_with_a_checkpoint(tiny_models, toy_task, tmp_path):
    out = tmp_path / "stopped"
    cmd = tiny_job(tiny_models["t5"], toy_task, out, steps=20)
    job = start(cmd, tmp_path, nproc=2)
    wait_for(lambda: logged_steps(out / "metrics.jsonl") >= 4, job)
    ranks = [p for p in psutil.Process(job.pid).children(recursive=True) if "--local_rank=1" in p.cmdline()]
    assert len(ranks) == 1, [p.cmdline() for p in psutil.Process(job.pid).children(recursive=True)]
    ranks[0].send_signal(signal.SIGTERM)  # a signal reaching one rank is enough: rank 0 writes the checkpoint
    seconds = finish(job, grace=60)
    output = (tmp_path / "out.txt").read_text()
    assert job.returncode == 143, output[-3000:]
    lines = interrupted_lines(output)
    assert len(lines) == 1, output[-3000:]
    step = int(lines[0].split()[3])
    assert 4 <= step < 20 and lines[0].startswith(f"interrupted at step {step} of 20; checkpoint written (")
    assert lines[0].endswith("; run the same command to resume") and "Traceback" not in output
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{step:08d}"

    # SIGTERM to the launcher only (./launch.sh): it reaches the ranks through DeepSpeed's launcher
    job = start(cmd, tmp_path, nproc=2)
    wait_for(lambda: logged_steps(out / "metrics.jsonl") >= step + 2, job)
    job.send_signal(signal.SIGTERM)
    finish(job, grace=60)
    output = (tmp_path / "out.txt").read_text()
    assert job.returncode == 143 and f"resumed from step {step}" in output, output[-3000:]
    lines = interrupted_lines(output)
    assert len(lines) == 1 and "checkpoint written" in lines[0] and "Traceback" not in output, output[-3000:]
    second = int(lines[0].split()[3])
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]

    resumed = run(cmd, nproc=2, launcher="deepspeed")
    assert f"resumed from step {second}" in resumed.stdout + resumed.stderr
    run(tiny_job(tiny_models["t5"], toy_task, tmp_path / "straight", steps=20), nproc=2, launcher="deepspeed")
    a, b = read_results(out), read_results(tmp_path / "straight")
    assert [h["step"] for h in a["history"]] == list(range(1, 21))
    assert [h["loss"] for h in a["history"]] == pytest.approx([h["loss"] for h in b["history"]], rel=1e-6, abs=1e-7)
    for name, tensor in read_adapter(tmp_path / "straight" / "adapter")[1].items():
        torch.testing.assert_close(read_adapter(out / "adapter")[1][name], tensor, rtol=1e-5, atol=1e-7)
    print(
        f"SIGTERM to rank 1: stopped at step {step}, every rank gone {seconds:.1f} s after the signal; to the launcher: {second}"
    )


RECIPE = """
name: preempted
model: {model}
ds_config: zero3_cpu
output_dir: {out}
dept: {{num_virtual_tokens: 4, r: 2, max_length: 32}}
train: {{batch_size: 8, steps: 16, warmup_steps: 2, log_every: 1, save_every_minutes: 60}}
data: {{eval_mode: score, max_eval_rows: 8}}
tracking: {{uri: "sqlite:///{db}", experiment: preempted}}
stages:
  - {{name: source, tasks: [syn-source-animal]}}
"""


def test_sigterm_to_a_recipe_marks_its_mlflow_run_killed_and_the_rerun_continues_it(tiny_models, tmp_path):
    from mlflow.tracking import MlflowClient

    recipe = tmp_path / "recipe.yaml"
    db = tmp_path / "mlflow.db"
    recipe.write_text(RECIPE.format(model=tiny_models["t5"], out=tmp_path / "run", db=db))
    job = start(["run", str(recipe)], tmp_path, env=holds(tmp_path, 3))  # 16 steps last 0.2 s on an idle machine
    held_at(tmp_path, 3, job)
    job.send_signal(signal.SIGTERM)
    release(tmp_path, 3)
    finish(job, grace=60)
    output = (tmp_path / "out.txt").read_text()
    assert job.returncode == 143 and len(interrupted_lines(output)) == 1, output[-3000:]
    assert "Traceback" not in output
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("preempted").experiment_id
    (child,) = [r for r in client.search_runs([experiment]) if r.data.tags.get("dept.role") == "child"]
    assert child.info.status == "KILLED"
    stopped_at = max(m.step for m in client.get_metric_history(child.info.run_id, "loss"))

    run(["run", str(recipe)])
    runs = client.search_runs([experiment])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)  # the parent and the same child
    history = client.get_metric_history(child.info.run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 17)), sorted(m.step for m in history)
    assert 3 <= stopped_at < 16


def test_a_default_job_killed_after_its_first_time_based_checkpoint_resumes_from_it(tiny_models, toy_task, tmp_path):
    out = tmp_path / "out"
    # a checkpoint every 0.6 s; 400 steps (60 ended before the first one on an idle machine: ~90 steps/s)
    cmd = tiny_job(tiny_models["t5"], toy_task, out, "--save_every_minutes", "0.01", steps=400)
    job = start(cmd, tmp_path)
    latest = out / "checkpoints" / "latest"
    warmup_end = "step-00000002"
    wait_for(lambda: latest.exists() and latest.read_text().strip() not in ("", warmup_end), job)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    step = int(latest.read_text().strip().split("-")[1])
    resumed = run(cmd)
    assert f"resumed from step {step}" in resumed.stdout + resumed.stderr
    assert [h["step"] for h in read_results(out)["history"]] == list(range(1, 401))


def test_a_second_launch_on_a_running_jobs_folder_is_refused_and_a_killed_one_blocks_nothing(
    tiny_models, toy_task, tmp_path
):
    out = tmp_path / "out"
    cmd = tiny_job(tiny_models["t5"], toy_task, out, steps=60)
    # The first launch stays at step 3 (a fault hook hangs it there, holding the folder): a 60-step job on an idle
    # machine finishes before a second process has started.
    first = start(cmd, tmp_path, env={"DEPT_FAULT_HANG_AT_STEP": "3"})
    wait_for(lambda: logged_steps(out / "metrics.jsonl") >= 3, first)
    started = time.monotonic()
    second = run(cmd, check=False, timeout=120)
    refused_in = time.monotonic() - started
    assert second.returncode == 2, second.stderr[-2000:]
    assert second.stderr.strip().splitlines() == [
        line for line in second.stderr.strip().splitlines() if f"is in use by pid {first.pid} on " in line
    ]
    os.killpg(first.pid, signal.SIGKILL)  # kill -9: the kernel drops its lock
    first.wait()
    run(cmd, timeout=600)
    assert json.loads((out / "results.json").read_text())["history"][-1]["step"] == 60
    print(f"second launch refused in {refused_in:.1f} s")


def test_a_real_full_disk_stops_the_job_in_one_line_and_the_rerun_resumes(tiny_models, toy_task, tmp_path):
    """The output folder on a real 8 MiB tmpfs that fills up mid-run (tests/test_interrupts.py fakes ENOSPC with a
    hook; this found what the hook could not: safetensors reports a full disk as its own error, and a checkpoint
    written then ended in a traceback). One `error: disk full writing ...` line, exit 2, the last complete
    checkpoint intact, and once there is room the same command resumes from it to a complete history."""
    assert os.geteuid() == 0, "this test mounts a tmpfs: run it as root (CI does)"
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], check=True)
    try:
        out = disk / "out"
        cmd = tiny_job(tiny_models["t5"], toy_task, out, "--save_every", "20", steps=200)
        job = start(cmd, tmp_path, env=holds(tmp_path, 25))
        held_at(tmp_path, 25, job)  # after the step-20 checkpoint
        filler = disk / "filler"
        with open(filler, "wb") as handle, pytest.raises(OSError, match="No space left"):
            while True:
                handle.write(b"\0" * 2**20)
                handle.flush()
        release(tmp_path, 25)
        assert job.wait(timeout=300) == 2
        output = (tmp_path / "out.txt").read_text()
        errors = [line for line in output.splitlines() if line.startswith("error")]
        assert len(errors) == 1 and errors[0].startswith("error: disk full writing "), output[-3000:]
        assert "run the same command to resume" in errors[0] and "MiB free" in errors[0]
        assert "Traceback" not in output and "Logging error" not in output, output[-3000:]
        tag = (out / "checkpoints" / "latest").read_text().strip()
        assert (out / "checkpoints" / tag / "complete").exists()
        filler.unlink()
        resumed = run(cmd)
        assert f"resumed from step {int(tag.split('-')[1])}" in resumed.stdout + resumed.stderr
        assert [h["step"] for h in read_results(out)["history"]] == list(range(1, 201))
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
