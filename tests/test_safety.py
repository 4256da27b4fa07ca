"""Safe files, checked on the source: torch files are read with weights_only=True, YAML with safe_load, no eval or
exec, servers bind to 127.0.0.1 by default."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted((REPO / "pipeline").rglob("*.py"))


def test_every_torch_load_uses_weights_only():
    for path in SOURCES:
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path.name}: {call}"


def test_yaml_is_read_with_safe_load_and_nothing_is_evaluated():
    for path in SOURCES:
        text = path.read_text()
        assert not re.search(r"yaml\.load\(", text), path.name
        assert not re.search(r"(?<![\w.])(eval|exec)\(", text), path.name
        assert "pickle.load" not in text, path.name


def test_adapters_are_safetensors():
    text = (REPO / "pipeline" / "adapters.py").read_text()
    assert "safetensors" in text and "torch.save" not in text


def test_readme_binds_servers_to_localhost():
    readme = (REPO / "README.md").read_text()
    for line in readme.splitlines():
        if re.search(r"\bmlflow (server|ui) --", line):  # a command line, not prose
            assert "--host 127.0.0.1" in line, line
