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
