"""The README is executable: every code block in it runs as written, in README order, in a fresh copy of the
repository (what a clone gives) against the installed wheel, and the outputs it promises exist. Blocks marked
`<!-- readme: not run (why) -->` (GPUs, a real cluster, the test suite itself) are skipped and counted.

Only the environment variables the README documents near its top shrink the long runs: DEPT_MAX_STEPS caps every
job's steps. The install line runs with `pip` and `python3 -m venv` standing in for the wheel this test installed
(nothing is downloaded), and `.venv` is that environment. Also: the README's numbers are copies of the files the
project writes (tests/support/readme.py), so they cannot drift silently.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import needs_task_data
from support.installed import build_wheel, environment, fresh_venv
from support.readme import REPO, blocks, generated_sections

# The README documents these: DEPT_MAX_STEPS for trying its commands quickly (it keeps this test in minutes; the
# README's DEPT_MAX_EVAL_ROWS is left unset so evaluation runs as written), DEPT_DATA_DIR for local task data,
# AUTHORS for where the DePT authors' released checkpoints are.
SHARED = REPO.parent / "shared" / "data"
DOCUMENTED_ENV = {
    "DEPT_MAX_STEPS": "12",
    "DEPT_DATA_DIR": os.environ.get("DEPT_DATA_DIR", str(SHARED)),
    "AUTHORS": str(Path(os.environ.get("DEPT_DATA_DIR", str(SHARED))) / "authors_adapters"),
}
# What a block promises, by a line it contains: files (relative to the copy) and text its output shows.
PROMISES = {
    "dept run quickstart": ["runs/quickstart/summary.md", "runs/quickstart/summary.png", "| target |"],
    "dept predict": ["preds.jsonl", "preds.metrics.json"],
    "dept import-adapter": ["adapters/cola/adapter_config.json"],
    "load_dept(": ["prediction:"],
    "PEFT and load_dept logits differ": ["differ by at most 0.0"],  # LoRA: PEFT loads our adapter, same logits
    "train.lr_prompt=0.2": ["ran before with other settings", "--rerun_changed", "refused, as it should be"],
}
# pip: the package line is skipped (the wheel this test built is installed in .venv); the torch line is resolved
# for real, not installed: --dry-run --report records which torch it picks. Here PyTorch's wheel index is out of
# reach: pip retries it (5 times per package, over a minute; --retries 0 here) and then takes this machine's local
# CPU wheel (PIP_FIND_LINKS); elsewhere it takes the index's. Either way the build must be +cpu.
PRELUDE = """set -eo pipefail
pip() {
  if [[ " $* " == *" torch=="* ]]; then
    command pip install --dry-run --ignore-installed --no-deps --retries 0 --quiet \\
      --report "$PIP_REPORTS/$(date +%s%N).json" "${@:2}" || return
    echo "(readme test: pip $* resolved, not installed; the wheel is installed in .venv)"; return 0
  fi
  echo "(readme test: pip $* skipped; the wheel is installed in .venv)"
}
python3() { if [[ "$1 $2" == "-m venv" ]]; then return 0; fi; command python3 "$@"; }
"""


def test_the_readme_numbers_are_copies_of_the_files_the_project_writes():
    sections = generated_sections()
    assert sections, "the README quotes numbers: they must come from generated sections"
    for name, body in sections:
        assert body == (REPO / name).read_text().strip("\n"), (
            "README.md is out of date: python tests/support/readme.py --write"
        )


def test_every_readme_block_marked_not_run_says_why():
    for block in blocks():
        if block.not_run is not None:
            assert len(block.not_run) > 10, block.line


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the working tree as a clone would give it (tracked and new files, nothing ignored), with `.venv`
    the fresh environment the wheel is installed in."""
    root = tmp_path_factory.mktemp("readme")
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    copy = root / "dept-pipeline"
    for name in files:
        if (REPO / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
    venv = fresh_venv(root / "venv", build_wheel(root / "dist"))
    (copy / ".venv").symlink_to(venv)
    return copy, venv


@pytest.mark.slow
@needs_task_data("mnli", "qnli", "rte", "cb", "authors_adapters")
def test_every_readme_block_runs_as_written(checkout):
    copy, venv = checkout
    reports = copy.parent / "pip-reports"
    reports.mkdir(exist_ok=True)
    env = {**environment(venv), **DOCUMENTED_ENV, "PYTHONUNBUFFERED": "1", "PIP_REPORTS": str(reports)}
    ran, skipped, outputs = [], [], {}
    for block in blocks():
        if block.language not in ("bash", "python") or block.not_run is not None:
            skipped.append((block.line, block.not_run or f"a {block.language or 'plain'} block"))
            continue
        if block.language == "bash":
            cmd = ["bash", "-c", PRELUDE + block.code]
        else:
            cmd = [str(venv / "bin" / "python"), "-c", block.code]
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, (
            f"README block at line {block.line} failed ({proc.returncode}):\n{block.code}\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
        ran.append(block.line)
        outputs[block.line] = (block.code, proc.stdout + proc.stderr)
    for needle, promised in PROMISES.items():
        where = [line for line, (code, _) in outputs.items() if needle in code]
        assert where, f"no README block runs {needle!r}"
        shown = "".join(outputs[line][1] for line in where)
        for item in promised:
            assert (copy / item).exists() or item in shown, f"{needle}: promised {item} is missing"
    torches = [
        item["metadata"]["version"]
        for report in sorted(reports.glob("*.json"))
        for item in json.loads(report.read_text())["install"]
        if item["metadata"]["name"] == "torch"
    ]
    assert len(torches) >= 2 and all(v.endswith("+cpu") for v in torches), torches  # quickstart and Install lines
    print(f"README: {len(ran)} blocks ran (lines {ran}); {len(skipped)} not run: {skipped}; torch lines: {torches}")
    assert len(ran) >= 10


# The README's own training examples, at their full length: what a user copying them gets must be a model that
# answers (a learning rate that teaches the prompt something generation cannot use would pass the test above).
LEARNING_EXAMPLES = {
    "--task stories-who": "runs/who/results.json",
    "--custom_task ../pets/task.yaml": "elsewhere/runs/pets/results.json",
    "--method lora --model stories260K": "runs/lora/results.json",
}


@pytest.mark.slow
def test_the_readme_training_examples_learn_at_full_length(checkout, tmp_path):
    _, venv = checkout
    env = {**environment(venv), "PYTHONUNBUFFERED": "1"}  # no DEPT_MAX_STEPS: the commands as a user runs them
    for needle, results in LEARNING_EXAMPLES.items():
        (block,) = [b for b in blocks() if needle in b.code and b.not_run is None]
        proc = subprocess.run(
            ["bash", "-c", PRELUDE + block.code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900
        )
        assert proc.returncode == 0, f"README block at line {block.line}:\n{proc.stderr[-3000:]}"
        test = json.loads((tmp_path / results).read_text())["test"]
        print(f"README line {block.line}: test {test}")
        assert test["accuracy"] >= 90 and test["invalid"] == 0, (block.line, test)
