"""The MLflow tracking server goes away mid-run (a real `mlflow server` on 127.0.0.1, stopped and restarted on the
same port and store): training goes on, one warning when it goes and one when it is back, what failed to send is
kept in the job folder's tracking-pending.jsonl and sent when it answers; a server that never comes back leaves the
records for `dept sync-tracking OUTPUT_DIR`. The metric history ends complete: one value per logged step. #21"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import free_port, run
from support import held_at, holds, logged_steps, release
from test_preemption import start, wait_for

from pipeline.tracking import PENDING_FILE, check_reachable

pytestmark = pytest.mark.slow

RECIPE = """
name: outage
model: {model}
ds_config: zero3_cpu
output_dir: {out}
dept: {{num_virtual_tokens: 4, r: 2, max_length: 32}}
train: {{batch_size: 8, warmup_steps: 2, log_every: 1}}
data: {{eval_mode: score, max_eval_rows: 8}}
tracking: {{uri: "{uri}", experiment: outage}}
stages:
  - {{name: first, tasks: [syn-source-animal], train: {{steps: {first}}}}}
  - {{name: second, tasks: [syn-warm-animal], train: {{steps: {second}}}}}
"""


def tracked_recipe(tiny_models, tmp_path: Path, first: int, second: int) -> tuple[Path, int, str, Path, Path]:
    """The two-job recipe tracked on a free 127.0.0.1 port: (the server's folder, port, URI, output dir, recipe)."""
    root = tmp_path / "server"
    root.mkdir()
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE.format(model=tiny_models["t5"], out=out, uri=uri, first=first, second=second))
    return root, port, uri, out, recipe


def serve(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port over the same store every time; returns once /health answers."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", f"sqlite:///{root}/server.db", "--artifacts-destination", str(root / "artifacts")]
    log = open(root / f"server-{time.monotonic_ns()}.log", "w")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while True:
        try:
            check_reachable(f"http://127.0.0.1:{port}", timeout_s=2)
            return proc
        except Exception:
            assert proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.5)


def stop(server: subprocess.Popen) -> None:
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def finished_children(uri: str, steps: dict[str, int]) -> dict:
    """The recipe's child runs by stage, every run FINISHED and each child's loss logged once per step 1..steps."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    children = {r.data.tags["dept.stage"]: r for r in runs if r.data.tags.get("dept.role") == "child"}
    assert set(children) == set(steps)
    assert all(r.info.status == "FINISHED" for r in runs), [(r.data.tags, r.info.status) for r in runs]
    for name, last in steps.items():
        logged = sorted(m.step for m in client.get_metric_history(children[name].info.run_id, "loss"))
        assert logged == list(range(1, last + 1)), (name, logged)
    return children


def test_the_tracking_server_goes_away_mid_run_and_the_history_ends_complete(tiny_models, tmp_path):
    root, port, uri, out, recipe = tracked_recipe(tiny_models, tmp_path, first=1200, second=100)
    server = serve(root, port)
    # The first job waits after step 3 (server up) and after step 600 (server down) until the test lets it go: the
    # outage falls inside it however fast the machine runs.
    job = start(["run", str(recipe)], tmp_path, env={"DEPT_TRACKING_PROBE_S": "2", **holds(tmp_path, 3, 600)})
    first, second = out / "first" / "metrics.jsonl", out / "second" / "metrics.jsonl"
    seen: list[tuple[float, int]] = []  # (time, steps logged): the step rate with the server up and down

    def steps_of_first() -> int:
        seen.append((time.monotonic(), logged_steps(first)))
        return seen[-1][1]

    try:
        wait_for(lambda: steps_of_first() >= 1, job)
        held_at(tmp_path, 3, job)
        # a rough rate for the printout (the first look may already see 3 steps on an idle machine: no zero span)
        up_rate = (seen[-1][1] - 1) / max(seen[-1][0] - next(t for t, n in seen if n >= 1), 1e-3)
        stop(server)  # down for a stretch of the first job ...
        down_at, down_t = 3, time.monotonic()
        release(tmp_path, 3)
        wait_for(lambda: steps_of_first() >= down_at + 10, job)
        down_rate = (seen[-1][1] - down_at) / max(time.monotonic() - down_t, 1e-3)
        held_at(tmp_path, 600, job)
        server = serve(root, port)  # ... and back before it ends
        release(tmp_path, 600)
        wait_for(lambda: logged_steps(second) >= 3, job)
        stop(server)  # down during the second job, and never back while the run lasts
        assert job.wait(timeout=600) == 0, (tmp_path / "out.txt").read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = (tmp_path / "out.txt").read_text()
    assert output.count("does not answer") == 2 and output.count("answers again") == 1, output[-4000:]
    assert f"still unreachable: unsent records wait in {out / 'second' / PENDING_FILE}" in output
    assert "dept sync-tracking" in output
    kept = [json.loads(line) for line in (out / "second" / PENDING_FILE).read_text().splitlines()]
    assert {r["kind"] for r in kept} >= {"batch", "terminate"}

    server = serve(root, port)
    try:
        synced = run(["sync-tracking", str(out)])
        assert "sent" in synced.stdout and not (out / "second" / PENDING_FILE).exists()
        finished_children(uri, {"first": 1200, "second": 100})
    finally:
        stop(server)
    print(
        f"steps/s with the server up {up_rate:.2f}, down {down_rate:.2f} (ratio {down_rate / max(up_rate, 1e-9):.2f})"
    )


def test_a_job_that_starts_while_the_server_is_away_runs_and_gets_its_run_later(tiny_models, tmp_path):
    """The server goes away during the first job and is still away when the second starts: the second job runs
    without an MLflow run (one warning; it used to wait through MLflow's retries and fail), the recipe ends 0, and
    the same command run again once the server is back creates the second job's run from its folder (the loss
    curve, validation and test) and sends the first job's kept records."""
    root, port, uri, out, recipe = tracked_recipe(tiny_models, tmp_path, first=150, second=30)
    server = serve(root, port)
    # the first job waits after step 3 until the server is gone (it used to finish first on a fast machine)
    job = start(["run", str(recipe)], tmp_path, env={"DEPT_TRACKING_PROBE_S": "2", **holds(tmp_path, 3)})
    try:
        held_at(tmp_path, 3, job)
        stop(server)
        release(tmp_path, 3)
        assert job.wait(timeout=600) == 0, (tmp_path / "out.txt").read_text()[-3000:]
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    output = (tmp_path / "out.txt").read_text()
    assert output.count("runs without its MLflow run") == 1 and "Traceback" not in output, output[-4000:]
    assert (out / "second" / "results.json").exists() and not (out / "second" / PENDING_FILE).exists()

    server = serve(root, port)
    try:
        again = run(["run", str(recipe)])
        assert "runs without its MLflow run" not in again.stdout + again.stderr
        second = finished_children(uri, {"first": 150, "second": 30})["second"].data
        result = json.loads((out / "second" / "results.json").read_text())
        assert second.metrics["test_score"] == pytest.approx(result["test_score"], abs=1e-4)
        assert any(key.startswith("eval_") for key in second.metrics), sorted(second.metrics)
    finally:
        stop(server)
