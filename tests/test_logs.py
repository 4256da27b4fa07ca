"""What reaches the console (#22): this pipeline's messages and the warnings that matter; DeepSpeed's accelerator
and op messages, third-party INFO and progress bars only in the job's log file, unless --verbose."""

from __future__ import annotations

import logging

from conftest import run

from pipeline import logs


def test_a_job_console_holds_our_lines_and_its_log_file_the_library_messages(tmp_path, monkeypatch):
    out = tmp_path / "job"
    args = ["train", "--model", "stories260K", "--task", "stories-who", "--output_dir", str(out), "--steps", "2"]
    args += ["--warmup_steps", "1", "--batch_size", "4", "--num_virtual_tokens", "4", "--lora_rank", "1"]
    args += ["--max_length", "64", "--max_eval_rows", "4", "--max_new_tokens", "2"]
    args += ["--sharding", "zero3"]  # DeepSpeed in one process (by default it runs none there: #24), so it speaks
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # as a user has it: DeepSpeed's detection warned here
    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    proc = run(args)
    console = proc.stdout + proc.stderr
    for noise in ("Setting accelerator", "built successfully", "tokenize", "Loading weights", "DeepSpeed info"):
        assert noise not in console, noise
    assert "trainable parameters: " in proc.stderr and "done: final loss" in proc.stdout
    kept = (out / "job.log").read_text()
    assert "built successfully" in kept and "trainable parameters: " in kept and "DeepSpeed info" in kept
    assert "ZeRO stage 3 in one process: asked for (--sharding zero3)" in kept  # the choice, said once


def record(name: str, level: int) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, "message", None, None)


def test_the_console_keeps_our_info_and_others_warnings_and_verbose_keeps_all(monkeypatch):
    monkeypatch.delenv(logs.VERBOSE_ENV, raising=False)
    console = logs.ConsoleFilter()
    assert console.filter(record("pipeline.train", logging.INFO))
    assert console.filter(record("transformers.modeling_utils", logging.WARNING))
    assert not console.filter(record("DeepSpeed", logging.INFO))
    with logs.one_line_per_job():  # a recipe's jobs: their details in job.log, a resume still said
        assert not console.filter(record("pipeline.train", logging.INFO))
        resumed = record("pipeline.train", logging.INFO)
        resumed.__dict__.update(logs.ALWAYS_ON_CONSOLE)
        assert console.filter(resumed)
    monkeypatch.setenv(logs.VERBOSE_ENV, "1")
    assert console.filter(record("DeepSpeed", logging.INFO))


def test_a_long_loop_says_how_far_it_is_and_a_short_one_says_nothing(caplog, monkeypatch):
    clock = iter(range(0, 1000, 20))  # each look at the clock: 20 s later
    monkeypatch.setattr("time.monotonic", lambda: next(clock))
    with caplog.at_level(logging.INFO, logger="pipeline.evaluation"):
        assert list(logs.progress(list(range(10)), "validation", rows=300, every_s=30)) == list(range(10))
    lines = [r.getMessage() for r in caplog.records]
    assert lines, "a loop of minutes logged no progress"
    assert lines[0].startswith("validation: 30 of 300 rows, 40 s so far, about 6 min left")
    assert all(getattr(r, "console", False) for r in caplog.records)  # shown inside a recipe too
    caplog.clear()
    monkeypatch.setattr("time.monotonic", lambda: 0.0)
    with caplog.at_level(logging.INFO, logger="pipeline.evaluation"):
        list(logs.progress(list(range(10)), "validation", rows=300))
    assert not caplog.records


def test_a_full_disk_under_the_job_log_is_said_once_and_logging_goes_on(tmp_path, capsys):
    """#21: a log file that cannot grow (ENOSPC) must not print a traceback for every record."""
    import errno

    from pipeline.logs import _FileOnceTheFolderExists

    handler = _FileOnceTheFolderExists(tmp_path / "job.log")
    handler.setFormatter(logging.Formatter("%(message)s"))
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "step %d", (1,), None)
    handler.emit(record)

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    handler.stream = Full()
    for _ in range(3):
        handler.emit(record)
    err = capsys.readouterr().err
    assert err.count("disk full writing") == 1 and "Traceback" not in err and "Logging error" not in err
    assert (tmp_path / "job.log").read_text() == "step 1\n"
    handler.close()
