"""Fault injection for the reliability tests: proof that crashes lose nothing and failures do not hang.

At the step named by an environment variable, rank $DEPT_FAULT_RANK (default 0) is SIGKILLed (`*_KILL_*`), raises
(`DEPT_FAULT_RAISE_AT_STEP`), hangs (`DEPT_FAULT_HANG_AT_STEP`) or sends itself SIGTERM
(`DEPT_FAULT_SIGNAL_AT_STEP`, a preemption reaching one rank); `DEPT_FAULT_NAN_AT_STEP` makes one loss NaN;
`DEPT_FAULT_ENOSPC=TEXT` makes every atomic write to a path containing TEXT fail as a full disk would
(`disk_full`). Unset variables cost one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time


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


def nan_at(step: int) -> bool:
    """True at the (1-based) step whose loss the NaN test wants poisoned."""
    return os.environ.get("DEPT_FAULT_NAN_AT_STEP") == str(step)


def disk_full(path) -> None:
    """Raise OSError(ENOSPC) for a write to `path` when $DEPT_FAULT_ENOSPC names part of it."""
    text = os.environ.get("DEPT_FAULT_ENOSPC")
    if text and text in str(path):
        import errno

        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
