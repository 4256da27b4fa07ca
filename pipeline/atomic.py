"""Writes that are all-or-nothing: a reader sees the old content or the new one, never half of either.

Files: write to a temporary sibling, fsync, `os.replace`. Directories (adapters): build `<dir>.tmp-*`, move the
old `<dir>` aside to `<dir>.old`, rename the new one in, then delete the old one. A crash between the two renames
leaves only `<dir>.old`, which `recover_dir` puts back, so a good adapter is never lost.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.faults import disk_full

FULL = (errno.ENOSPC, errno.EDQUOT)  # no space left; disk quota exceeded


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp/mkdtemp create 0600/0700 entries; results and adapters get the permissions a plain open() would give.
_MASK = _umask()
FILE_MODE = 0o666 & ~_MASK
DIR_MODE = 0o777 & ~_MASK


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            disk_full(path)  # the tests' ENOSPC
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def recover_dir(path: str | Path) -> None:
    """Undo a directory swap interrupted between its two renames."""
    path = Path(path)
    old = path.with_name(path.name + ".old")
    if not path.exists() and old.exists():
        os.rename(old, path)


@contextmanager
def replace_dir(path: str | Path):
    """Yield a fresh temporary directory; on success it atomically becomes `path` (replacing any old one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        tmp.chmod(DIR_MODE)
        yield tmp
        disk_full(path)  # the tests' ENOSPC
        for child in tmp.iterdir():
            with open(child, "rb") as handle:
                os.fsync(handle.fileno())
            if child.is_file():
                child.chmod(FILE_MODE)  # some writers (safetensors) create 0600 files
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def disk_full_message(exc: OSError) -> str | None:
    """The one line for a write that failed because the disk (or the quota) is full, else None: the path, the free
    space left there, and that nothing complete was lost (every write here is all-or-nothing). #21"""
    if exc.errno not in FULL:
        return None
    path = Path(exc.filename or ".")
    where = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        free = f"{shutil.disk_usage(where).free / 2**20:.1f} MiB free"
    except OSError:
        free = "free space unknown"
    what = "disk quota exceeded" if exc.errno == errno.EDQUOT else "disk full"
    return (
        f"{what} writing {path} ({free} on that file system): free space there (or choose another --output_dir) and "
        "run the same command to resume; the last complete checkpoint and finished results are intact"
    )


@contextmanager
def full_disk_as_oserror(path: str | os.PathLike):
    """safetensors reports a full disk as its own error ("I/O error: No space left on device (os error 28)"), which
    no `except OSError` catches, so a checkpoint written on a full disk ended in a traceback (found by a real full
    tmpfs, tests/test_interrupts.py; #21). Inside, such an error is raised as OSError(ENOSPC or EDQUOT, path)."""
    try:
        yield
    except OSError:
        raise
    except Exception as exc:
        found = re.search(r"os error (\d+)", str(exc))
        if found and int(found.group(1)) in FULL:
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from exc
        raise


def save_tensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors' `save_file` (contiguous copies), a full disk raised as OSError (`full_disk_as_oserror`)."""
    from safetensors.torch import save_file

    with full_disk_as_oserror(path):
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


@contextmanager
def explain_disk_full():
    """A full disk inside the block becomes a one-line PipelineError (`disk_full_message`)."""
    try:
        yield
    except OSError as exc:
        message = disk_full_message(exc)
        if message is None:
            raise
        raise PipelineError(message) from exc
