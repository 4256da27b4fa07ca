"""SIGTERM and SIGINT stop a job at a step boundary, with a checkpoint, instead of killing it mid-step. #21

    with interrupts.handled():                 # the CLI, around every command
        ...
        with interrupts.at_step_boundaries():  # the training loop: a signal only sets a flag meanwhile
            for step in ...:
                ...
                signum = distributed.max_over_ranks(interrupts.pending(), ...)   # every rank decides together
                if signum: save a checkpoint; raise interrupts.Interrupted(signum, step, steps, ...)

Schedulers (SLURM, Kubernetes, spot instances) send SIGTERM and wait a grace period before SIGKILL; a terminal's
Ctrl-C sends SIGINT to every process of the foreground group (the launcher and each rank). Inside the training loop
the first signal only sets a flag; at the next step boundary an all-reduce of the flag (max of the signal number)
makes every rank stop at the same step, so the signal reaching one rank or the launcher is enough (DeepSpeed's
launcher forwards SIGINT/SIGTERM to its ranks as SIGTERM), and the checkpoint's gather has every rank taking part.
A second SIGINT exits at once (status 130): the last complete checkpoint stays, since checkpoints are written
atomically. A repeated SIGTERM, or a SIGTERM after a SIGINT (the launcher forwarding a Ctrl-C the rank already
received) changes nothing. Outside the training loop (loading data, building the model, a final evaluation) a
signal stops the command at once with the same one line and no traceback.

The exit status is the shell's convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: list[int] = []  # the signals received so far, in order
_at_boundaries = False  # True while a training loop checks `pending()` at each step boundary


class Interrupted(KeyboardInterrupt):
    """A job stopped by SIGINT/SIGTERM. A KeyboardInterrupt, so that `except Exception` never swallows it and the
    MLflow tracker marks the run KILLED. `str()` is the one line the CLI prints."""

    def __init__(self, signum: int, step: int | None = None, steps: int | None = None, checkpoint: str = "", where=""):
        self.signum, self.step, self.steps = int(signum), step, steps
        name = signal.Signals(self.signum).name
        at = f" at step {step} of {steps}" if step is not None else f" ({name})"
        place = f" ({where})" if where else ""
        checkpoint = checkpoint or "the last complete checkpoint stays"
        super().__init__(f"interrupted{at}{place}; {checkpoint}; run the same command to resume")

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _say(text: str) -> None:
    """A line on stderr from a signal handler (os.write: no buffered stream is re-entered)."""
    with contextlib.suppress(OSError):
        os.write(2, (text + "\n").encode())


def _handler(signum: int, frame) -> None:
    first = not _received
    _received.append(signum)
    if signum == signal.SIGINT and _received.count(signal.SIGINT) > 1:
        _say("second interrupt: exiting at once; the last complete checkpoint stays; run the same command to resume")
        os._exit(128 + signum)
    if not _at_boundaries:
        raise Interrupted(signum)
    if first and _local_rank() == 0:
        name = signal.Signals(signum).name
        _say(f"{name} received: stopping after this step with a checkpoint (Ctrl-C again to exit at once)")


def _local_rank() -> int:
    value = os.environ.get("LOCAL_RANK", "").strip()
    return int(value) if value.isdigit() else 0


def pending() -> int:
    """The first signal received and not acted on (its number), or 0."""
    return _received[0] if _received else 0


@contextlib.contextmanager
def handled():
    """SIGINT and SIGTERM handled as this module says while the block runs (main thread only; elsewhere nothing
    changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for sig in SIGNALS:  # also where the parent ignored SIGINT (bash starts `cmd &` so): the launcher forwards it
        signal.signal(sig, _handler)
    _received.clear()
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        _received.clear()


@contextlib.contextmanager
def at_step_boundaries():
    """While the block runs, a first signal only sets the flag `pending()` reads (the loop stops at a boundary)."""
    global _at_boundaries
    _at_boundaries = True
    try:
        yield
    finally:
        _at_boundaries = False
