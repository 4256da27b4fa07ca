"""What reaches the console and what only the log files keep.

The console shows this pipeline's own messages (INFO and up) and other libraries' warnings that matter; library
chatter (DeepSpeed's op loading, third-party INFO, `datasets`' progress bars, transformers' weight-loading bar) goes
only to the job's log file (`<output_dir>/job.log`; a recipe's own lines to `<output_dir>/run.log`), unless
`--verbose` (DEPT_VERBOSE=1) puts everything on the console too. Nothing here imports torch or DeepSpeed.

    logs.setup(rank=0)                       # once per process, by the CLI
    with logs.to_file(out / "job.log"):      # everything logged meanwhile is also written there
        ...
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path

from pipeline import atomic

VERBOSE_ENV = "DEPT_VERBOSE"
OURS = ("pipeline", "dept")
# Libraries whose INFO records are chatter even in a log file (migrations, HTTP, locks).
QUIET = ("alembic", "httpx", "urllib3", "filelock", "torch.distributed", "datasets", "compilers")
FORMAT = "[rank{rank}] %(levelname)s %(name)s: %(message)s"
FILE_FORMAT = "%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def is_ours(record: logging.LogRecord) -> bool:
    return record.name.split(".")[0] in OURS


class ConsoleFilter(logging.Filter):
    """Our INFO and up; others' WARNING and up; everything when verbose. Inside `one_line_per_job()` (a recipe's
    jobs) our jobs' INFO details stay in their job.log too: the recipe prints one line per job instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if verbose() or record.levelno >= logging.WARNING:
            return True
        if getattr(record, "console", False):  # `log.info(..., extra=ALWAYS_ON_CONSOLE)`: e.g. a resume
            return True
        return is_ours(record) and not (_job_details_hidden and record.name.startswith(JOB_DETAIL_LOGGERS))


ALWAYS_ON_CONSOLE = {"console": True}
JOB_DETAIL_LOGGERS = ("pipeline.job", "pipeline.train", "pipeline.engine", "pipeline.data")
_job_details_hidden = False


@contextlib.contextmanager
def one_line_per_job():
    global _job_details_hidden
    _job_details_hidden = True
    try:
        yield
    finally:
        _job_details_hidden = False


def setup(rank: int, verbose_flag: bool = False) -> None:
    """Console handler on stderr (rank 0: INFO; other ranks: WARNING), python warnings through logging, library
    progress bars off unless verbose. Without a visible GPU, DeepSpeed is told its accelerator (DS_ACCELERATOR=cpu,
    the choice it would make) instead of warning on every start that it "was unable to detect" one; where a GPU is
    visible it still detects, and warns if it fails."""
    if verbose_flag:
        os.environ[VERBOSE_ENV] = "1"
    from pipeline.resources import gpu_visible

    if "DS_ACCELERATOR" not in os.environ and not gpu_visible():
        os.environ["DS_ACCELERATOR"] = "cpu"
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT.format(rank=rank)))
    console.addFilter(ConsoleFilter())
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.set_name("dept-console")
    root.addHandler(console)
    root.setLevel(logging.INFO)
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose() else logging.WARNING)
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    if not verbose():
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def adopt(name: str) -> None:
    """Route a library logger that writes to its own handler (DeepSpeed's: stdout, propagation off) through ours:
    its messages then follow the console rules above and reach the log files."""
    logger = logging.getLogger(name)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    logger.propagate = True
    logger.setLevel(logging.DEBUG if verbose() else logging.INFO)


def quiet_transformers() -> None:
    """transformers' own progress bars (loading weights) off unless verbose; hub download bars stay."""
    if verbose():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


class _LineLogger(io.TextIOBase):
    """A text stream that logs each complete line (for libraries that print)."""

    def __init__(self, logger: logging.Logger, level: int):
        self.logger, self.level, self.pending = logger, level, ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self.pending += text
        *lines, self.pending = self.pending.split("\n")
        for line in lines:
            if line.strip():
                self.logger.log(self.level, line.strip())
        return len(text)

    def flush(self) -> None:
        if self.pending.strip():
            self.logger.log(self.level, self.pending.strip())
        self.pending = ""


@contextlib.contextmanager
def prints_logged(name: str, level: int = logging.INFO):
    """What a library prints to stdout meanwhile is logged by `name` instead (stdout stays for results)."""
    stream = _LineLogger(logging.getLogger(name), level)
    with contextlib.redirect_stdout(stream):
        try:
            yield
        finally:
            stream.flush()


class _FileOnceTheFolderExists(logging.Handler):
    """Appends to `path` once its folder exists (the job made it: nothing is left behind by a job refused before
    it wrote anything); records from before are kept in memory and written first."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self.path, self.pending, self.stream = path, [], None
        self.disk_full = False  # said once; from then on the console alone has the job's lines

    def emit(self, record: logging.LogRecord) -> None:
        if self.disk_full:
            return
        try:
            line = self.format(record) + "\n"
            if self.stream is None and self.path.parent.is_dir():
                self.stream = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
                self.stream.writelines(self.pending)
                self.pending = []
            if self.stream is None:
                self.pending.append(line)
            else:
                self.stream.write(line)
                self.stream.flush()
        except OSError as exc:
            if exc.errno not in atomic.FULL:
                self.handleError(record)
                return
            # a full disk: say so once and keep logging to the console (a traceback per record otherwise, #21)
            self.disk_full, self.pending = True, []
            if self.stream is not None:
                with contextlib.suppress(OSError):  # its buffer cannot be flushed either
                    self.stream.close()
                self.stream = None
            print(f"warning: disk full writing {self.path}: the job's log goes on on the console only", file=sys.stderr)
        except Exception:  # noqa: BLE001 -- logging must never break the job
            self.handleError(record)

    def close(self) -> None:
        if self.stream is None and self.pending and self.path.parent.is_dir():
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.writelines(self.pending)
        if self.stream is not None:
            self.stream.close()
        super().close()


@contextlib.contextmanager
def to_file(path: str | Path, rank: int | None = None):
    """Everything logged meanwhile (every library, INFO and up) is appended to `path` once its folder exists.
    Global rank 0 only: the output folder is written by rank 0 alone (a shared filesystem, many nodes); the other
    ranks' warnings and errors reach their stderr, which the launcher prefixes with the rank."""
    from pipeline import distributed

    rank = distributed.rank() if rank is None else rank
    path = Path(path)
    if rank:
        yield None
        return
    handler = _FileOnceTheFolderExists(path)
    handler.setFormatter(logging.Formatter(FILE_FORMAT.format(rank=rank)))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()


def progress(items: list, what: str, rows: int, every_s: float = 30.0, logger: str = "pipeline.evaluation"):
    """`items` unchanged, with a line every `every_s` seconds while they last (none for a short loop): how far a
    long evaluation is. The lines show on the console even inside a recipe (a job that evaluates for minutes must
    not look hung) and stay in the job's log.

        validation: 1,024 of 4,000 rows, 95 s so far, about 4 min left
    """
    import time

    started = last = time.monotonic()
    out = logging.getLogger(logger)
    for done, item in enumerate(items):
        now = time.monotonic()
        if done and now - last >= every_s:
            last = now
            shown = min(rows, round(rows * done / len(items)))
            left = (now - started) * (len(items) - done) / done
            out.info(
                "%s: %s of %s rows, %.0f s so far, about %s left",
                what,
                f"{shown:,}",
                f"{rows:,}",
                now - started,
                f"{left:.0f} s" if left < 90 else f"{left / 60:.0f} min",
                extra=ALWAYS_ON_CONSOLE,
            )
        yield item
