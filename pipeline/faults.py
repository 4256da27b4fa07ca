"""Fault injection for the reliability tests: proof that crashes lose nothing and failures do not hang.

At the step named by an environment variable, rank $DEPT_FAULT_RANK (default 0) is SIGKILLed (`*_KILL_*`), raises
(`DEPT_FAULT_RAISE_AT_STEP`), hangs (`DEPT_FAULT_HANG_AT_STEP`) or sends itself SIGTERM
(`DEPT_FAULT_SIGNAL_AT_STEP`, a preemption reaching one rank); `DEPT_FAULT_NAN_AT_STEP` makes one loss NaN;
`DEPT_FAULT_ENOSPC=TEXT` makes every atomic write to a path containing TEXT fail as a full disk would
(`disk_full`); `DEPT_FAULT_HOLD_AT_STEPS` holds a job at given steps until the test lets it go (`hold`). Unset
variables cost one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def fault(variable: str, step: int, rank: int) -> None:
    if os.environ.get(variable) != str(step) or rank != int(os.environ.get("DEPT_FAULT_RANK", "0")):
        return
    if "HANG" in variable:
        time.sleep(10**6)
    if "SIGNAL" in variable:
        os.kill(os.getpid(), signal.SIGTERM)
        return
    if "RAISE" in variable:
        raise RuntimeError(f"injected failure on rank {rank} at step {step}")
    os.kill(os.getpid(), signal.SIGKILL)


def hold(step: int, rank: int) -> None:
    """Hold the job after a step listed in $DEPT_FAULT_HOLD_AT_STEPS ("3,600") until the test lets it go: rank 0
    writes $DEPT_FAULT_HOLD_DIR/held-<step> and waits for release-<step> there (other ranks wait in the next
    collective). A test then acts at a known step instead of racing a job that may finish first on a fast machine."""
    steps = os.environ.get("DEPT_FAULT_HOLD_AT_STEPS")
    if not steps or rank != 0 or str(step) not in steps.split(","):
        return
    folder = Path(os.environ["DEPT_FAULT_HOLD_DIR"])
    (folder / f"held-{step}").touch()
    while not (folder / f"release-{step}").exists():
        time.sleep(0.05)


def nan_at(step: int) -> bool:
    """True at the (1-based) step whose loss the NaN test wants poisoned."""
    return os.environ.get("DEPT_FAULT_NAN_AT_STEP") == str(step)


def disk_full(path) -> None:
    """Raise OSError(ENOSPC) for a write to `path` when $DEPT_FAULT_ENOSPC names part of it."""
    text = os.environ.get("DEPT_FAULT_ENOSPC")
    if text and text in str(path):
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
