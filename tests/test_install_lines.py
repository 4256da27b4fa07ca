"""The README's install lines are right on an ordinary machine (#22): a plain `pip install torch==X` resolves to
PyPI's CUDA build on Linux (about 2.5 GB with the nvidia-* packages), so CPU-only lines name PyTorch's CPU wheel
index and the GPU line a CUDA one; all pin the torch that constraints.txt and CI pin. (The README test resolves the
CPU lines with pip for real: tests/test_readme.py.)"""

from __future__ import annotations

import re

from support.readme import REPO, blocks

CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
TORCH = re.compile(r"pip install (?:-q )?torch==(\S+)(.*?)(?:&&|$)", re.M)


def torch_lines(run: bool) -> list[tuple[str, str]]:
    """(pinned version, rest of the line) of every `pip install torch==...` in README blocks run (or not run)."""
    found = []
    for block in blocks():
        if block.language == "bash" and (block.not_run is None) == run:
            found += [(m.group(1), m.group(2).strip()) for m in TORCH.finditer(block.code)]
    return found


def pinned_torch() -> str:
    (pin,) = re.findall(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
    return pin


def test_the_readmes_cpu_install_lines_name_the_cpu_wheel_index():
    lines = torch_lines(run=True)
    assert len(lines) >= 2, "the quickstart line and the Install section's CPU line"
    for version, rest in lines:
        assert version == pinned_torch()
        assert rest == CPU_INDEX, f"a CPU install line without PyTorch's CPU wheel index: torch=={version} {rest}"


def test_the_readmes_gpu_install_line_names_a_cuda_index():
    lines = torch_lines(run=False)
    assert lines and all(v == pinned_torch() for v, _ in lines)
    assert any(re.fullmatch(r"--index-url https://download\.pytorch\.org/whl/cu\d+", rest) for _, rest in lines)


def test_ci_installs_the_same_torch():
    """CI's machines find the CPU wheel in a local wheel folder; its line stays the plain pin."""
    assert f"pip install -q torch=={pinned_torch()}\n" in (REPO / ".ci" / "run").read_text()
