"""Atomic writes (atomic.py): a file or a directory is either the old one or the whole new one, never half."""

from __future__ import annotations

import json

import pytest

from pipeline import atomic


def test_files_are_replaced_whole_with_plain_permissions(tmp_path):
    path = tmp_path / "deep" / "results.json"
    atomic.write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
    assert path.stat().st_mode & 0o777 == atomic.FILE_MODE
    atomic.write_text(path, "new\n")
    assert path.read_text() == "new\n" and [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_a_directory_is_swapped_only_when_its_writer_succeeds(tmp_path):
    target = tmp_path / "adapter"
    with atomic.replace_dir(target) as tmp:
        (tmp / "weights").write_bytes(b"1")
    with pytest.raises(RuntimeError), atomic.replace_dir(target) as tmp:
        (tmp / "weights").write_bytes(b"half")
        raise RuntimeError("crash while writing")
    assert (target / "weights").read_bytes() == b"1" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_a_swap_cut_between_its_two_renames_is_recovered(tmp_path):
    target = tmp_path / "adapter"
    old = tmp_path / "adapter.old"
    old.mkdir()
    (old / "weights").write_bytes(b"1")
    atomic.recover_dir(target)
    assert (target / "weights").read_bytes() == b"1" and not old.exists()


def test_a_full_disk_reported_by_safetensors_becomes_an_oserror_naming_the_path(tmp_path):
    """safetensors raises its own error for a full disk (#21): inside `full_disk_as_oserror` it is the OSError every
    `except OSError` (and the one-line `disk full` message) handles; other errors pass unchanged."""
    import errno

    import torch

    target = tmp_path / "trainable.safetensors"
    with pytest.raises(OSError) as full, atomic.full_disk_as_oserror(target):
        raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert full.value.errno == errno.ENOSPC and full.value.filename == str(target)
    assert atomic.disk_full_message(full.value).startswith(f"disk full writing {target}")
    with pytest.raises(RuntimeError, match="os error 13"), atomic.full_disk_as_oserror(target):
        raise RuntimeError("I/O error: Permission denied (os error 13)")
    atomic.save_tensors({"a": torch.ones(2, 3).t()}, target)  # a non-contiguous tensor is fine
    assert target.stat().st_size > 0
