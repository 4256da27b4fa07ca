"""Shared fixtures: tiny saved backbones, a small learnable task, and helpers that launch real ranks."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("DEPT_DATA_DIR", str(REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    """One tokenizer cache for the whole session, shared with the subprocesses the tests launch."""
    os.environ.setdefault("DEPT_CACHE", str(tmp_path_factory.mktemp("dept-cache")))


LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CROSS_RANK",
    "CROSS_SIZE",
)


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
# Tests that read the shipped task files (DEPT_DATA_DIR, default ../shared/data) skip with a reason when a bare
# clone does not have them; every other test runs without them.
SHIPPED_DATA = Path(os.environ.get("DEPT_DATA_DIR") or REPO.parent / "shared" / "data")


def missing_task_data(*tasks: str) -> list[str]:
    """The named tasks whose folder is absent from the shipped data (all of them when it is absent)."""
    return [task for task in tasks if not (SHIPPED_DATA / task).is_dir()]


def needs_task_data(*tasks: str):
    """Marker: skip unless DEPT_DATA_DIR holds a folder for each named task (or, with no names, exists)."""
    missing = missing_task_data(*tasks) if tasks else ([] if SHIPPED_DATA.is_dir() else ["any task"])
    return pytest.mark.skipif(
        bool(missing),
        reason=f"real task data not found ({', '.join(missing)} under {SHIPPED_DATA}): "
        "set DEPT_DATA_DIR to the shipped data folder (default ../shared/data)",
    )


@pytest.fixture(scope="session")
def shipped_data() -> Path:
    """The shipped data folder; skips the test when it is absent."""
    if not SHIPPED_DATA.is_dir():
        pytest.skip(f"real task data not found at {SHIPPED_DATA}: set DEPT_DATA_DIR (default ../shared/data)")
    return SHIPPED_DATA


@pytest.fixture(scope="module")
def one_process_group():
    """A one-rank process group for in-process engine tests. It stays up for the session: DeepSpeed keeps its
    communication backend once created. `run` strips the launcher variables it sets from subprocesses."""
    from pipeline.engine import init_distributed

    init_distributed()
