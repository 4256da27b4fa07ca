"""Checkpoint bookkeeping without training: only complete checkpoints count, leftovers are pruned, an unreadable
or foreign checkpoint is refused with one line, and the per-step seeding is a pure function of (seed, step, rank)."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.checkpoint import FORMAT_VERSION, Checkpoints, seed_step
from pipeline.errors import PipelineError


def make(root, step, complete=True, state=None):
    folder = root / f"step-{step:08d}"
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps(state or {"format_version": FORMAT_VERSION, "step": step}))
    if complete:
        (folder / "complete").write_text(f"{step}\n")
    return folder


def test_only_a_complete_checkpoint_is_the_latest(tmp_path):
    checkpoints = Checkpoints(tmp_path, keep=2)
    assert checkpoints.latest() is None
    make(tmp_path, 3)
    make(tmp_path, 6, complete=False)  # interrupted after writing its files, before its marker
    (tmp_path / "latest").write_text("step-00000006\n")
    assert checkpoints.latest() is None  # the pointer names an incomplete one: start over rather than trust it
    (tmp_path / "latest").write_text("step-00000003\n")
    assert checkpoints.latest() == "step-00000003"


def test_pruning_keeps_the_newest_complete_and_drops_leftovers(tmp_path):
    for step in (1, 2, 3):
        make(tmp_path, step)
    make(tmp_path, 4, complete=False)
    (tmp_path / ".step-00000005.tmp-x").mkdir()
    Checkpoints(tmp_path, keep=2)._prune(keep_tag="step-00000003")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]


def test_a_foreign_checkpoint_is_refused_with_one_line(tmp_path):
    make(tmp_path, 3, state={"format_version": 1, "step": 3})
    (tmp_path / "latest").write_text("step-00000003\n")
    with pytest.raises(PipelineError, match="delete the checkpoints folder") as err:
        Checkpoints(tmp_path, keep=2).load(engine=None)
    assert "\n" not in str(err.value)


def test_step_seeding_depends_on_seed_step_and_rank_only():
    def draw(seed, step, rank):
        torch.manual_seed(999)  # whatever came before
        seed_step(seed, step, rank)
        return torch.rand(3)

    assert torch.equal(draw(42, 7, 0), draw(42, 7, 0))
    assert not torch.equal(draw(42, 7, 0), draw(42, 8, 0))
    assert not torch.equal(draw(42, 7, 0), draw(42, 7, 1))
