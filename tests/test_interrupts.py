"""Faults a long run meets, in-process (one rank, a real ZeRO-3 engine): SIGTERM/SIGINT stop at a step boundary
with a checkpoint and the re-run equals an uninterrupted run; checkpoints by default on a wall-clock cadence; a
damaged checkpoint falls back to the previous one; a full disk stops the job in one line and the re-run resumes;
a second SIGINT exits at once; a second launch on the same output folder is refused. #21"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO
from test_train import job

from pipeline import interrupts
from pipeline.adapters import read_adapter
from pipeline.checkpoint import Checkpoints
from pipeline.data import read_source_target
from pipeline.errors import PipelineError
from pipeline.train import train


def same_training(a, b) -> None:
    assert [h["step"] for h in a.history] == [h["step"] for h in b.history]
    assert [h["loss"] for h in a.history] == pytest.approx([h["loss"] for h in b.history], rel=1e-6)


def same_adapter(dir_a, dir_b) -> None:
    a, b = read_adapter(dir_a)[1], read_adapter(dir_b)[1]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)


def test_sigterm_stops_at_the_step_boundary_with_a_checkpoint_and_the_rerun_equals_an_uninterrupted_run(
    tmp_path, toy_task, monkeypatch
):
    rows = read_source_target(toy_task)
    straight = train(job(tmp_path, toy_task, "straight", log_every=2), rows)
    monkeypatch.setenv("DEPT_FAULT_SIGNAL_AT_STEP", "3")  # SIGTERM to itself after step 3's boundary check
    with interrupts.handled(), pytest.raises(interrupts.Interrupted) as stopped:
        train(job(tmp_path, toy_task, "stopped", log_every=2), rows)
    assert stopped.value.exit_status == 143 and (stopped.value.step, stopped.value.steps) == (4, 8)
    line = str(stopped.value)
    assert line.startswith("interrupted at step 4 of 8; checkpoint written (") and "\n" not in line, line
    assert line.endswith("; run the same command to resume"), line
    checkpoints = Checkpoints(tmp_path / "stopped" / "checkpoints", 2)
    assert checkpoints.latest() == "step-00000004"  # the default (time-based) job still checkpoints on a signal
    assert not (tmp_path / "stopped" / "adapter").exists()
    monkeypatch.delenv("DEPT_FAULT_SIGNAL_AT_STEP")
    resumed = train(job(tmp_path, toy_task, "stopped", log_every=2), rows)
    same_training(resumed, straight)
    same_adapter(tmp_path / "stopped" / "adapter", tmp_path / "straight" / "adapter")


def test_explicit_save_every_0_writes_no_checkpoint_even_when_stopped(tmp_path, toy_task, monkeypatch):
    monkeypatch.setenv("DEPT_FAULT_SIGNAL_AT_STEP", "2")
    with interrupts.handled(), pytest.raises(interrupts.Interrupted) as stopped:
        train(job(tmp_path, toy_task, "none", save_every=0, steps=4), read_source_target(toy_task))
    assert "no checkpoint (save_every 0)" in str(stopped.value)
    assert not (tmp_path / "none" / "checkpoints").exists()


def test_a_default_job_checkpoints_at_the_end_of_warmup_and_on_its_wall_clock_cadence(tmp_path, toy_task):
    rows = read_source_target(toy_task)
    train(job(tmp_path, toy_task, "slow_clock", steps=6, warmup_steps=2, save_every_minutes=60), rows)
    assert Checkpoints(tmp_path / "slow_clock" / "checkpoints", 2).complete() == ["step-00000002"]  # warm-up's end
    train(job(tmp_path, toy_task, "fast_clock", steps=6, warmup_steps=2, save_every_minutes=1e-6), rows)
    kept = Checkpoints(tmp_path / "fast_clock" / "checkpoints", 2).complete()
    assert kept == ["step-00000005", "step-00000004"]  # every step was due; the last two kept (never the final step)


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_a_damaged_checkpoint_falls_back_to_the_previous_one_with_a_warning(damage, tmp_path, toy_task, caplog):
    rows = read_source_target(toy_task)
    full = train(job(tmp_path, toy_task, "full", save_every=2, steps=8), rows)
    checkpoints = Checkpoints(tmp_path / "full" / "checkpoints", 2)
    assert checkpoints.complete() == ["step-00000006", "step-00000004"]
    tensors = checkpoints.root / "step-00000006" / "trainable.safetensors"
    data = bytearray(tensors.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) - 5] ^= 0x01  # one bit of one tensor value: safetensors would still load it
    tensors.write_bytes(bytes(data))
    (tmp_path / "full" / "results.json").unlink(missing_ok=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.checkpoint"):
        assert checkpoints.choose() == "step-00000004"
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "step-00000006 is damaged" in warnings[0], warnings
    assert "resuming from step-00000004 instead" in warnings[0] and "checksum" in warnings[0]
    resumed = train(job(tmp_path, toy_task, "full", save_every=2, steps=8), rows)
    same_training(resumed, full)  # resumed from step 4: the same losses as the first run


def test_a_full_disk_stops_in_one_line_keeps_the_last_checkpoint_and_the_rerun_resumes(tmp_path, toy_task, monkeypatch):
    rows = read_source_target(toy_task)
    monkeypatch.setenv("DEPT_FAULT_ENOSPC", "step-00000004")  # the disk fills while step 4's checkpoint is written
    with pytest.raises(PipelineError) as full:
        train(job(tmp_path, toy_task, "out", save_every=2, steps=8), rows)
    message = str(full.value)
    assert message.startswith("disk full writing ") and "step-00000004" in message and "MiB free" in message
    assert "run the same command to resume" in message and "\n" not in message
    checkpoints = Checkpoints(tmp_path / "out" / "checkpoints", 2)
    assert checkpoints.latest() == "step-00000002" and checkpoints.verify("step-00000002") is None
    assert not list(checkpoints.root.glob("*step-00000004*"))  # no half-written folder left
    monkeypatch.setenv("DEPT_FAULT_ENOSPC", "results.json")
    straight = train(job(tmp_path, toy_task, "straight", save_every=2, steps=8), rows)  # no results.json: train()
    monkeypatch.delenv("DEPT_FAULT_ENOSPC")
    resumed = train(job(tmp_path, toy_task, "out", save_every=2, steps=8), rows)
    same_training(resumed, straight)


def run_python(code: str, timeout: int = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_a_second_sigint_exits_at_once_and_a_signal_outside_the_loop_stops_in_one_line():
    twice = run_python(
        """
        import os, signal, time
        from pipeline import interrupts
        with interrupts.handled(), interrupts.at_step_boundaries():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # the launcher forwarding the same Ctrl-C: no effect
            assert interrupts.pending() == signal.SIGINT
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(30)
        """
    )
    assert twice.returncode == 130, twice.stderr
    lines = twice.stderr.strip().splitlines()
    assert lines[0].startswith("SIGINT received: stopping after this step with a checkpoint"), lines
    assert lines[-1].startswith("second interrupt: exiting at once; the last complete checkpoint stays"), lines
    outside = run_python(
        """
        import os, signal, sys
        from pipeline import interrupts
        with interrupts.handled():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
            except interrupts.Interrupted as stop:
                print(stop); sys.exit(stop.exit_status)
        """
    )
    assert outside.returncode == 143 and outside.stdout.startswith("interrupted (SIGTERM); "), outside
