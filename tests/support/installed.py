"""The package as a user installs it: a wheel built from this checkout, installed (not editable) into a fresh
virtual environment, used from an unrelated working directory.

The fresh environment reuses the test environment's third-party packages through a `.pth` path entry (the same
versions; downloading torch and DeepSpeed again would cost minutes) but not its editable install of this package:
`import pipeline` there resolves to the wheel's copy only (checked).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_wheel(out: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(REPO)],
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    (wheel,) = out.glob("dept_pipeline-*.whl")
    return wheel


def fresh_venv(root: Path, wheel: Path) -> Path:
    """A venv with the wheel installed (no dependencies resolved: they come from this environment)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True, timeout=120)
    python = root / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    ours = sysconfig.get_paths()["purelib"]
    Path(site, "_shared_dependencies.pth").write_text(ours + "\n")  # a plain path: its .pth files do not run
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet", "--target", site, str(wheel)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (root / "bin" / "dept").write_text(f"#!{python}\nimport sys\nfrom pipeline.cli import main\nsys.exit(main())\n")
    (root / "bin" / "dept").chmod(0o755)
    return root


def environment(venv: Path) -> dict[str, str]:
    """The user's environment: the venv first on PATH, no PYTHONPATH, nothing pointing at this checkout."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(venv)
    return env
