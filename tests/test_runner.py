"""`dept run`'s orchestration (runner.py) without training: where the tracking store goes, what a job's folder
means for the run (reuse, resume, start, refuse) and the one-line refusal. A real recipe run with MLflow:
tests/test_fingerprint.py (in process) and tests/test_recipe_runs.py (several ranks)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from support import by_key, raises_one_line

from pipeline.recipe import load_recipe
from pipeline.runner import JobState, job_states, refuse_changed, tracking_uri


def test_a_run_from_the_repository_root_leaves_git_status_clean():
    """Everything `dept run` writes by default lies under the recipe's output_dir (runs/...: results, the MLflow
    store and its artifacts), which git ignores."""
    import shutil

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    from pipeline.runner import tracking_uri

    recipe = load_recipe("quickstart")
    store = tracking_uri(recipe).removeprefix("sqlite:///")
    assert Path(store).is_relative_to((REPO / "runs").resolve()) or Path(store).is_relative_to(Path.cwd() / "runs")
    paths = [
        "runs/quickstart/mlflow.db",
        "runs/quickstart/mlartifacts/1/x/artifacts/adapter/adapter_model.safetensors",
        "runs/quickstart/source/results.json",
    ]
    proc = subprocess.run(["git", "-C", str(REPO), "check-ignore", *paths], capture_output=True, text=True)
    assert proc.stdout.split() == paths


def test_the_tracking_store_follows_the_recipe_then_the_environment_then_the_output_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    recipe = load_recipe("quickstart", {"output_dir": str(tmp_path / "out")})
    assert tracking_uri(recipe) == f"sqlite:///{(tmp_path / 'out' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/env.db")
    assert tracking_uri(recipe) == f"sqlite:///{tmp_path}/env.db"
    chosen = load_recipe("quickstart", {"tracking.uri": f"sqlite:///{tmp_path}/recipe.db"})
    assert tracking_uri(chosen) == f"sqlite:///{tmp_path}/recipe.db"
    assert tracking_uri(load_recipe("quickstart", {"tracking.enabled": "false"})) is None


def test_new_jobs_start_and_changed_ones_are_refused_in_one_line(jobs):
    states = job_states(jobs)
    assert {s.action for s in states} == {"start"}  # nothing ran yet
    changed = [JobState(by_key(jobs, "source"), "rerun", ["config.train.steps"])] + states[1:]
    message = raises_one_line(
        "1 job(s) ran before with other settings: source (config.train.steps)", refuse_changed, changed
    )
    assert "--rerun_changed" in message
    refuse_changed(states)  # nothing changed: no error


CONSOLE_RECIPE = """
name: console
model: random:tiny-t5
ds_config: zero3_cpu
output_dir: out
dept: {num_virtual_tokens: 4, r: 2, max_length: 32}
train: {batch_size: 8, steps: 4, warmup_steps: 1}
data: {eval_mode: score, max_eval_rows: 8}
tracking: {enabled: false}
stages:
  - {name: source, tasks: [syn-source-animal]}
  - {name: transfer, type: transfer, source: source, targets: [syn-target-food], k: [4], seeds: [1, 2]}
"""


@pytest.mark.slow
def test_the_console_tells_which_job_runs_what_it_scored_and_where_the_summary_is(tmp_path):
    """#22: one line per job as it starts and ends (its place in the plan, score, time; the stage's time left once
    one of its jobs has run), no per-job detail lines, the summary's files at the end."""
    from conftest import run

    (tmp_path / "recipe.yaml").write_text(CONSOLE_RECIPE)
    proc = run(["run", str(tmp_path / "recipe.yaml"), f"--output_dir={tmp_path / 'out'}"])
    lines = proc.stdout.splitlines()
    started = [line for line in lines if line.endswith("started") or "started (stage" in line]
    ended = [line for line in lines if re.match(r"\[\d/3\] .*: test accuracy \d+\.\d, \d+ s$", line)]
    assert [line.split(":")[0] for line in started] == [
        "[1/3] source",
        "[2/3] transfer seed=1 k=4 source syn-target-food",  # what differs in the stage first
        "[3/3] transfer seed=2 k=4 source syn-target-food",
    ], lines
    assert len(ended) == 3, lines
    assert "stage transfer: about" in started[2] and "about" not in started[1]  # an ETA once a job of the stage ran
    out = tmp_path / "out"
    assert f"summary: {out / 'summary.md'}, {out / 'summary.json'}, {out / 'summary.png'}" in proc.stdout
    assert "trainable parameters" not in proc.stderr and "data: {" not in proc.stderr  # in each job.log instead
    assert "trainable parameters" in (out / "source" / "job.log").read_text()
    # again: every job reused, said so on its line
    again = run(["run", str(tmp_path / "recipe.yaml"), f"--output_dir={tmp_path / 'out'}"]).stdout
    assert len(re.findall(r"^\[\d/3\] .*: test accuracy \d+\.\d, reused$", again, re.M)) == 3, again
