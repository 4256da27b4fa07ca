"""Shared fixtures: tiny saved backbones, a small learnable task, a small planned recipe, and helpers that launch
real ranks. Helpers that are not fixtures (raises_one_line, train_argv, ...) and the scripts the tests drive are
in tests/support/.

Where the tests of each module are: `pipeline/X.py` -> `tests/test_X.py` (fast unless marked slow), and these
behavioural suites beside them:
    cli.py, options.py     test_cli.py, test_options.py; every bad input in one line: test_bad_inputs.py
    config.py              test_config.py; fingerprint.py: test_fingerprint.py (also reuse / refuse by `dept run`)
    recipe.py              test_recipe.py; recipes run end to end: test_recipe_runs.py, the README's: test_readme.py
    runner.py              test_runner.py; mlflow_record.py: test_mlflow_record.py; tracking.py: test_tracking.py;
                           several jobs at once (workers.py, --parallel, --join): test_parallel.py;
                           the MLflow UI in a browser: test_mlflow_ui.py; summary.py, plots.py: test_summary.py,
                           test_plots.py
    job.py, train.py       test_job.py, test_train.py; one loss for every batch split: test_batch_split.py; real
                           tasks on two ranks: test_task_runs.py; the stories260K backbone: test_real_backbone.py
    engine.py              test_engine.py (ZeRO-3 ranks, resume); distributed.py: test_distributed.py; clusters and
                           lost nodes: test_cluster.py; kills, hangs, NaN: test_reliability.py
    dept.py, model.py      test_dept.py, test_model.py; generation: test_generation.py; precision: test_precision.py
    evaluation.py          test_evaluation.py; metrics.py: test_metrics.py; inference.py: test_inference.py
    adapters.py, interop   test_adapters.py, test_interop.py; safetensors and weights_only loading: test_safety.py
    checkpoint.py, atomic  test_checkpoint.py, test_atomic.py; preflight.py: test_preflight.py
    data.py                test_data.py, test_data_scale.py (memory-mapped rows at scale)
    tasks/                 test_tasks.py, test_splits.py, test_sampling.py, test_bad_rows.py, test_hub_loading.py
    backbone.py            test_backbone.py; bench/: test_bench.py; the import layers: test_imports.py;
                           the installed wheel: test_install.py; the README's install lines: test_install_lines.py
    logs.py                test_logs.py (what the console shows, what job.log keeps)
Not tested on their own: errors.py, _version.py, cache.py (a folder name), faults.py (fault injection, exercised by
test_reliability.py), resources.py (shipped files, exercised by test_recipe.py and test_install.py), tokenizer.py
(exercised by test_bench.py and every random:<preset> run).
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.distributed import LAUNCHER_VARIABLES  # what a test's subprocess drops (tests import it from here)

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Task data: DEPT_DATA_DIR when set (CI: ../shared/data), else ../shared/data when it is there, else the few dozen
# real rows per task shipped in tests/fixtures (a bare clone). The subprocesses the tests launch inherit the choice.
FIXTURE_DATA = REPO / "tests" / "fixtures"
if "DEPT_DATA_DIR" not in os.environ:
    _beside = REPO.parent / "shared" / "data"
    os.environ["DEPT_DATA_DIR"] = str(_beside if _beside.is_dir() else FIXTURE_DATA)


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """One tokenizer cache for the whole session, shared with the subprocesses the tests launch."""
    os.environ.setdefault("DEPT_CACHE", str(tmp_path_factory.mktemp("dept-cache")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(
    args: list[str],
    nproc: int = 1,
    launcher: str = "python",
    env: dict | None = None,
    timeout: int = 600,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """Run `dept ARGS` as a user would: one plain process, or `launch.sh` with the deepspeed launcher / torchrun."""
    inherited = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}  # an in-process group's
    full_env = {**inherited, "MASTER_PORT": str(free_port()), "PYTHONUNBUFFERED": "1", **(env or {})}
    if launcher == "python":
        cmd = [sys.executable, "-m", "pipeline.cli", *args]
    else:
        full_env.update(NPROC=str(nproc), LAUNCHER=launcher, OMP_NUM_THREADS="1")
        cmd = [str(REPO / "launch.sh"), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def write_toy_task(path: Path, n: int = 64, seed: int = 0) -> Path:
    """A small learnable task: does the sentence mention a cat? Single-token targets."""
    rng = random.Random(seed)
    words = "cat dog bird fish house car tree book".split()
    with open(path, "w") as handle:
        for _ in range(n):
            sentence = [rng.choice(words) for _ in range(rng.randint(2, 9))]
            target = "1" if "cat" in sentence else "0"
            handle.write(json.dumps({"source": "sentence: " + " ".join(sentence), "target": target}) + "\n")
    return path


def write_varied_task(path, n: int = 48, seed: int = 3):
    """Sources of 2-9 words, targets of 1-6 words: micro-batches hold very different numbers of target tokens."""
    rng = random.Random(seed)
    words = "cat dog bird fish house car tree book red blue green happy sad".split()
    with open(path, "w") as handle:
        for _ in range(n):
            source = "sentence: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 9)))
            target = " ".join(rng.choice(words) for _ in range(rng.randint(1, 6)))
            handle.write(json.dumps({"source": source, "target": target}) + "\n")
    return path


@pytest.fixture(scope="session")
def toy_task(tmp_path_factory) -> Path:
    return write_toy_task(tmp_path_factory.mktemp("data") / "toy.jsonl")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Tiny T5 and LLaMA saved as local model directories (from_pretrained loads them sharded)."""
    from pipeline.backbone import save_random_backbone

    root = tmp_path_factory.mktemp("models")
    return {
        arch: save_random_backbone(f"random:tiny-{arch}", root / f"tiny-{arch}", seed=0) for arch in ("t5", "llama")
    }


def read_results(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "results.json").read_text())


# Real task data ------------------------------------------------------------------------------------------
# Tests that read task files read SHIPPED_DATA (DEPT_DATA_DIR, see above). Tests that need complete splits (the split
# rules' row counts, data at scale) are marked `needs_full_data` and skip on the fixtures' samples.
SHIPPED_DATA = Path(os.environ["DEPT_DATA_DIR"])
ON_FIXTURES = SHIPPED_DATA.resolve() == FIXTURE_DATA.resolve()
GET_FULL_DATA = (
    "set DEPT_DATA_DIR to a folder of <task>/<split>.jsonl files with the Hugging Face hub datasets' columns and "
    "complete splits (glue, super_glue, paws/labeled_final, scitail/tsv_format; exported with "
    "datasets.load_dataset(...)[split].to_json), or run where ../shared/data sits beside the checkout"
)


def missing_task_data(*tasks: str) -> list[str]:
    """The named tasks whose folder is absent from the task data (all of them when it is absent)."""
    return [task for task in tasks if not (SHIPPED_DATA / task).is_dir()]


def why_missing(missing: list[str]) -> str:
    if ON_FIXTURES:
        return (
            f"{', '.join(missing)} not among the rows shipped in tests/fixtures (see its SOURCES.md): {GET_FULL_DATA}"
        )
    return f"task data not found ({', '.join(missing)} under {SHIPPED_DATA}): {GET_FULL_DATA}"


def needs_task_data(*tasks: str):
    """Marker: skip unless the task data holds a folder for each named task (or, with no names, exists)."""
    missing = missing_task_data(*tasks) if tasks else ([] if SHIPPED_DATA.is_dir() else ["any task"])
    return pytest.mark.skipif(bool(missing), reason=why_missing(missing))


def needs_full_data(*tasks: str):
    """Marker: the test counts or scales complete splits. Such tests run with the slow ones (the fast suite of a bare
    clone has none to skip) and skip on the fixtures' samples or where the tasks are absent
    (`pytest_collection_modifyitems` below adds both marks)."""
    return pytest.mark.needs_full_data(*tasks)


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("needs_full_data")
        if marker is None:
            continue
        item.add_marker(pytest.mark.slow)
        tasks = marker.args
        if ON_FIXTURES:
            item.add_marker(pytest.mark.skip(reason=f"needs complete splits of {', '.join(tasks)}: {GET_FULL_DATA}"))
        elif missing := missing_task_data(*tasks):
            item.add_marker(pytest.mark.skip(reason=why_missing(missing)))


@pytest.fixture(scope="session")
def shipped_data() -> Path:
    """The task data folder; skips the test when it is absent."""
    if not SHIPPED_DATA.is_dir():
        pytest.skip(why_missing(["any task"]))
    return SHIPPED_DATA


@pytest.fixture(scope="module")
def one_process_group():
    """A one-rank process group for in-process engine tests. It stays up for the session: DeepSpeed keeps its
    communication backend once created. `run` strips the launcher variables it sets from subprocesses."""
    from pipeline.engine import init_distributed

    init_distributed(process_group=True)


# A small recipe of every kind of job (finetune with a saved backbone, DePT and PT train stages, transfer stages of
# one and of two targets), planned but never run: what `dept run` would show for it is checked without training
# (tests/test_mlflow_record.py, test_summary.py, test_plots.py).
SMALL_RECIPE = """
name: small
description: a small recipe for the runner's tests
model: random:tiny-t5
ds_config: zero3_cpu
output_dir: {out}
dept: {{num_virtual_tokens: 4, r: 2, max_length: 32}}
train: {{batch_size: 8, steps: 12, warmup_steps: 3, log_every: 2, eval_every: 6}}
data: {{eval_mode: score, max_eval_rows: 16}}
stages:
  - {{name: warmup, method: finetune, save_model: true, tasks: [syn-warm-animal, syn-warm-food], train: {{lr: 0.003}}}}
  - {{name: source, model: "stage:warmup", tasks: [syn-source-animal]}}
  - {{name: prompt, method: pt, model: "stage:warmup", tasks: [syn-source-animal], dept: {{r: 0}}}}
  - name: transfer
    type: transfer
    model: "stage:warmup"
    source: source
    targets: [syn-target-food]
    k: [4, 8]
    seeds: [1, 2]
    control: true
  - name: wide
    type: transfer
    source: source
    model: "stage:warmup"
    targets: [syn-target-food, syn-target-vehicle]
    k: [4]
    seeds: [1]
"""


@pytest.fixture
def jobs(tmp_path):
    """The jobs of SMALL_RECIPE, planned into tmp_path/out."""
    from pipeline.recipe import load_recipe, plan

    path = tmp_path / "recipe.yaml"
    path.write_text(SMALL_RECIPE.format(out=tmp_path / "out"))
    return plan(load_recipe(str(path)))
