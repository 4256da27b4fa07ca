"""One process at a time in an output folder: a lock the kernel drops when its holder dies.

    with folder_lock.hold(output_dir, "dept train"):     # refuses at once if another process holds it
        ...
    claim = folder_lock.try_hold(job_dir, "worker 2")     # None if another process holds it (job claiming)

The lock is an `flock` on `<folder>/.dept.lock`. A process killed with SIGKILL (or a lost node's process, once its
kernel is gone) releases it with no clean-up by anyone, so a crashed run never blocks the next one; a stale lock
*file* is harmless because only the flock counts. The file holds who took it (pid, host, start, command) so a
refusal can name the other process. flock works on local disks and on NFSv4/Lustre/GPFS mounts that support it
(Lustre: mount with `-o flock`); where it is unsupported the call fails and we say so rather than run unlocked.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

LOCK_NAME = ".dept.lock"


@dataclass
class Claim:
    """A held lock; `release()` (or process exit) frees it."""

    path: Path
    handle: object

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def holder(folder: Path) -> str:
    """Who holds (or last held) the folder's lock, in words: 'pid 123 on node-1 since 18:30:02 (dept train ...)'."""
    try:
        who = json.loads((Path(folder) / LOCK_NAME).read_text())
    except (OSError, ValueError):
        return "another process"
    since = time.strftime("%H:%M:%S", time.localtime(who.get("started", 0)))
    return f"pid {who.get('pid')} on {who.get('host')} since {since} ({who.get('what')})"


def try_hold(folder: str | Path, what: str) -> Claim | None:
    """Take the folder's lock without waiting: a Claim, or None when another process holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError as exc:  # e.g. ENOLCK on a mount without flock support
        handle.close()
        raise PipelineError(
            f"cannot lock {path} ({exc.strerror}); this file system does not support flock: mount it with flock "
            "support (Lustre: -o flock) or choose an --output_dir on a local or NFSv4 disk"
        ) from exc
    handle.seek(0)
    handle.truncate()
    command = " ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    handle.write(
        json.dumps(
            {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "what": what, "command": command}
        )
    )
    handle.flush()
    return Claim(path, handle)


@contextmanager
def hold(folder: str | Path, what: str) -> Iterator[Claim]:
    """The folder's lock for the block, or a one-line PipelineError naming the process that holds it."""
    claim = try_hold(folder, what)
    if claim is None:
        raise PipelineError(
            f"{folder} is in use by {holder(Path(folder))}; wait for it to finish or stop it, or choose another "
            "--output_dir"
        )
    try:
        yield claim
    finally:
        claim.release()
