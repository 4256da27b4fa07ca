"""The installed wheel works from any working directory: shipped DeepSpeed configs and recipes by name, help,
version, a dry run and a few training steps, nothing resolved against the checkout (slow: builds the wheel)."""

from __future__ import annotations

import json
import subprocess
import zipfile

import pytest
from support.installed import build_wheel, environment, fresh_venv

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    wheel = build_wheel(root / "dist")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pipeline/ds_configs/zero3_cpu.json" in names and "pipeline/recipes/quickstart.yaml" in names
    assert not any(name.startswith(("tests/", "docs/")) for name in names)
    return fresh_venv(root / "venv", wheel)


def dept(venv, cwd, *args, timeout=600):
    return subprocess.run(
        ["dept", *args], cwd=cwd, env=environment(venv), capture_output=True, text=True, timeout=timeout
    )


def test_the_installed_package_is_the_wheel_not_the_checkout(venv, tmp_path):
    proc = subprocess.run(
        [
            "python",
            "-c",
            "import pipeline, pipeline.resources as r; print(pipeline.__file__); print(r.ds_config_path('zero3_cpu'))",
        ],
        cwd=tmp_path,
        env=environment(venv),
        capture_output=True,
        text=True,
        timeout=60,
    )
    module, config = proc.stdout.split()
    assert module.startswith(str(venv)) and config.startswith(str(venv)), proc.stdout


def test_help_version_and_a_dry_run_from_an_unrelated_directory(venv, tmp_path):
    assert dept(venv, tmp_path, "--version").stdout.startswith("dept-pipeline ")
    assert "--num_virtual_tokens" in dept(venv, tmp_path, "train", "--help").stdout
    dry = dept(venv, tmp_path, "run", "quickstart", "--dry_run")
    assert dry.returncode == 0, dry.stderr[-2000:]
    assert "recipe quickstart:" in dry.stdout and "zero3_cpu" in dry.stdout
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_a_few_training_steps_from_an_unrelated_directory(venv, tmp_path):
    proc = dept(
        venv,
        tmp_path,
        "train",
        "--model",
        "random:tiny-t5",
        "--task",
        "syn-target-food",
        "--output_dir",
        "out",
        "--steps",
        "4",
        "--warmup_steps",
        "1",
        "--batch_size",
        "4",
        "--num_virtual_tokens",
        "4",
        "--lora_rank",
        "2",
        "--max_length",
        "32",
        "--max_eval_rows",
        "8",
        "--eval_mode",
        "score",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["config"]["ds_config"] == "auto" and results["test"]["n"] == 8
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "out" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # every job draws its curves
