"""folder_lock: a second process is refused with the holder named; a SIGKILLed holder blocks no one."""

import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import folder_lock
from pipeline.errors import PipelineError

HOLDER = """
import sys, time
from pipeline import folder_lock
claim = folder_lock.try_hold(sys.argv[1], "test holder")
print("held" if claim else "busy", flush=True)
time.sleep(60)
"""


def _start_holder(folder):
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_second_holder_is_refused_naming_the_first_and_a_killed_holder_releases(tmp_path):
    process = _start_holder(tmp_path)
    try:
        assert folder_lock.try_hold(tmp_path, "second") is None
        with pytest.raises(PipelineError) as refused:
            with folder_lock.hold(tmp_path, "second"):
                pass
        message = str(refused.value)
        assert "\n" not in message and f"pid {process.pid}" in message and "test holder" in message
        assert "--output_dir" in message
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.time() + 10
    claim = None
    while claim is None and time.time() < deadline:  # the kernel drops the flock with the process
        claim = folder_lock.try_hold(tmp_path, "after the kill")
    assert claim is not None
    assert "after the kill" in folder_lock.holder(tmp_path)
    claim.release()


def test_the_lock_is_free_again_after_the_block(tmp_path):
    with folder_lock.hold(tmp_path / "new", "first"):
        assert folder_lock.try_hold(tmp_path / "new", "inside") is None
    claim = folder_lock.try_hold(tmp_path / "new", "after")
    assert claim is not None
    claim.release()
