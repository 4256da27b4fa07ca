"""What the tests share that is not a fixture (fixtures: tests/conftest.py), and the scripts the tests drive.

    from support import raises_one_line, train_argv

Scripts (each also runs on its own; its docstring says how):
    support/import_graph.py    the import graph of `pipeline` and its layers (tests/test_imports.py)
    support/cluster_sim.py     simulated cluster nodes: network namespaces, sshd, pdsh (tests/test_cluster.py)
    support/browser_check.py   a page of the MLflow UI in headless Chromium (tests/test_mlflow_ui.py)
    support/readme.py          the README's blocks and generated sections (tests/test_readme.py)
    support/installed.py       the wheel installed into a fresh venv (tests/test_install.py, tests/test_readme.py)
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from pipeline.errors import PipelineError

TINY_SHAPE = {"num_virtual_tokens": 4, "lora_rank": 2, "max_length": 16}  # a DePT adapter of a few hundred weights


def raises_one_line(fragment: str, call, *args, **kwargs) -> str:
    """Assert `call(*args, **kwargs)` raises a PipelineError whose message is one line holding `fragment`; the
    message."""
    with pytest.raises(PipelineError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and fragment in message, message
    return message


def train_argv(model, output_dir, *extra: str, **flags) -> list[str]:
    """The words of a `dept train` command: `--model`, `--output_dir`, the tiny DePT shape (`TINY_SHAPE`) and
    `flags` (a flag given as None is left out), then the `extra` words as they are."""
    words = ["train"]
    for flag, value in {"model": model, "output_dir": output_dir, **TINY_SHAPE, **flags}.items():
        if value is not None:
            words += [f"--{flag}", str(value)]
    return words + list(extra)


def by_key(jobs, key):
    return next(j for j in jobs if j.key == key)


def job_results(jobs) -> dict:
    """Made-up results of SMALL_RECIPE's jobs (conftest.py), as a summary reads them."""
    scores = {1: 55.00000000000001, 2: 60.0}
    results = {}
    for job in jobs:
        if job.meta["type"] == "train":
            results[job.key] = {
                "test": {
                    "syn-warm-animal.accuracy": 62.50000000000001,
                    "syn-warm-animal.n": 16,
                    "syn-warm-animal.invalid": 0,
                    "syn-warm-animal.score": 62.5,
                    "score": 62.5,
                },
                "best_step": 6,
                "final_loss": 1.2,
                "config": {"method": job.config.method},
                "history": [{"step": s, "loss": 2.0 / s} for s in (2, 4, 6)],
                "evals": [{"step": 6, "score": 50.0}, {"step": 12, "score": 62.5}],
            }
        else:
            bonus = 10.0 if job.meta["start"] == "source" else 0.0
            results[job.key] = {"test_score": scores[job.meta["seed"]] + bonus + job.meta["k"]}
    return results


def logged_steps(metrics: Path) -> int:
    """How many records a job's metrics.jsonl holds so far (0 before it exists)."""
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def holds(tmp_path: Path, *steps: int) -> dict[str, str]:
    """The environment that holds a job after each of `steps` until `release` (pipeline.faults.hold): the tests act
    at a known step instead of racing a job that a fast machine finishes first."""
    (tmp_path / "holds").mkdir(exist_ok=True)
    return {"DEPT_FAULT_HOLD_AT_STEPS": ",".join(map(str, steps)), "DEPT_FAULT_HOLD_DIR": str(tmp_path / "holds")}


def held_at(tmp_path: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until the job `proc` runs is held after `step`."""
    deadline = time.monotonic() + timeout
    while not (tmp_path / "holds" / f"held-{step}").exists():
        assert proc.poll() is None, f"exited {proc.returncode} before step {step}"
        assert time.monotonic() < deadline, f"not at step {step} within {timeout:.0f} s"
        time.sleep(0.05)


def release(tmp_path: Path, step: int) -> None:
    (tmp_path / "holds" / f"release-{step}").touch()
