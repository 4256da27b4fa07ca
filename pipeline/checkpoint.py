"""Resumable checkpoints of a training job, and the random state that makes a resumed job equal an uninterrupted one.

A checkpoint is `<output_dir>/checkpoints/step-<N>/` holding `trainable.safetensors` (every trainable tensor and
its AdamW moments at full size: for DePT the prompt, A and B, a few hundred KB; the frozen backbone is never in
it), `state.json` (step, evaluation history, world size) and a `complete` marker. `latest` names the newest complete
checkpoint and moves only after the marker is written, so a checkpoint cut off mid-write is never resumed from. The marker holds
each file's sha256: a checkpoint damaged later (truncated, a bit flipped) is detected at resume and the previous
complete one is used, with a warning (`keep_checkpoints`, default 2, keeps one to fall back to).
Because the tensors are whole (not DeepSpeed's per-rank partitions), a job checkpointed on N ranks resumes on any
number of ranks.

Random state is not stored: every step reseeds torch from (seed, step, rank) (`seed_step`), so a resumed job draws
the dropout masks the uninterrupted one drew. On another world size the per-rank streams differ (each rank sees
other rows), which matters only for backbones with dropout; the data order is a function of the global step alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline import atomic, distributed
from pipeline.errors import PipelineError
from pipeline.faults import fault

log = logging.getLogger(__name__)
FORMAT_VERSION = 2
TENSORS = "trainable.safetensors"


def seed_step(seed: int, step: int, rank: int) -> None:
    """Seed torch (all devices) for one training step, from the job's seed, the step and the rank."""
    torch.manual_seed((seed * 1_000_003 + step * 1_009 + rank) % 2**63)


class Checkpoints:
    """Checkpoints under `root` (`<output_dir>/checkpoints`), keeping the newest `keep` complete ones.

    The `complete` marker holds the sha256 of each file of its checkpoint: a resume verifies them and falls back to
    the previous complete checkpoint, with a warning, when a file is truncated or altered (a bit flip on disk, a
    copy cut short). #21"""

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = Path(root), keep

    @staticmethod
    def tag(step: int) -> str:
        return f"step-{step:08d}"

    def latest(self) -> str | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        tag = pointer.read_text().strip()
        return tag if (self.root / tag / "complete").exists() else None

    def complete(self) -> list[str]:
        """The complete checkpoints' tags, newest first."""
        return sorted((p.name for p in self.root.glob("step-*") if (p / "complete").exists()), reverse=True)

    def save(self, engine, step: int, run_state: dict) -> None:
        """Gather the trainable state (every rank) and write it on rank 0; a write that fails there (a full disk)
        fails on every rank alike, with the same one line."""
        tensors = engine.trainable_state()
        rank = distributed.rank()
        tag = self.tag(step)

        def write_files() -> dict[str, str]:
            state = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "run_state": run_state,
                "world_size": distributed.world_size(),
            }
            with atomic.explain_disk_full(), atomic.replace_dir(self.root / tag) as tmp:
                atomic.save_tensors(tensors, tmp / TENSORS)
                (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
                return {name: _sha256(tmp / name) for name in (TENSORS, "state.json")}

        digests = distributed.decided_on_rank0(write_files, what="writing the checkpoint")
        fault("DEPT_FAULT_KILL_IN_CHECKPOINT", step, rank)
        distributed.barrier()

        def mark_complete() -> None:
            with atomic.explain_disk_full():
                atomic.write_text(self.root / tag / "complete", json.dumps({"step": step, "sha256": digests}) + "\n")
                atomic.write_text(self.root / "latest", tag + "\n")
            self._prune(keep_tag=tag)

        distributed.decided_on_rank0(mark_complete, what="writing the checkpoint")

    def _prune(self, keep_tag: str) -> None:
        """Keep the newest `keep` complete checkpoints; drop leftovers of interrupted writes."""
        complete = sorted(p.name for p in self.root.glob("step-*") if (p / "complete").exists())
        doomed = [tag for tag in complete[: -self.keep] if tag != keep_tag]
        doomed += [p.name for p in self.root.glob("step-*") if not (p / "complete").exists()]
        doomed += [p.name for p in self.root.glob(".step-*")]  # a write cut off before its rename
        for tag in doomed:
            shutil.rmtree(self.root / tag, ignore_errors=True)

    def verify(self, tag: str) -> str | None:
        """Why checkpoint `tag` cannot be resumed from (a file missing, truncated or altered), or None when it is
        intact. Markers of older versions (a bare step number) carry no checksums: only readability is checked."""
        folder = self.root / tag
        try:
            marker = json.loads((folder / "complete").read_text())
        except (OSError, ValueError):
            marker = None
        digests = marker.get("sha256", {}) if isinstance(marker, dict) else {}
        for name in digests or ("state.json",):
            if not (folder / name).is_file():
                return f"{name} is missing"
        for name, expected in digests.items():
            if _sha256(folder / name) != expected:
                size = (folder / name).stat().st_size
                return f"{name} does not match the checksum written with it ({size} bytes; truncated or altered)"
        try:
            json.loads((folder / "state.json").read_text())
        except (OSError, ValueError):
            return "state.json is not readable"
        return None

    def choose(self) -> str | None:
        """The newest intact complete checkpoint (rank 0 checks; every rank gets its answer), warning once for each
        newer one that is damaged."""

        def pick() -> str | None:
            tags = self.complete()
            latest = self.latest()
            if latest in tags:  # the pointer first (it is the newest unless someone moved folders by hand)
                tags.remove(latest)
                tags.insert(0, latest)
            for i, tag in enumerate(tags):
                problem = self.verify(tag)
                if problem is None:
                    return tag
                after = f"resuming from {tags[i + 1]} instead" if i + 1 < len(tags) else "no other checkpoint is left"
                log.warning("checkpoint %s is damaged (%s): %s", self.root / tag, problem, after)
            if tags:
                log.warning("no intact checkpoint in %s: the job starts over from step 0", self.root)
            return None

        return distributed.decided_on_rank0(pick, what="choosing the checkpoint to resume from")

    def load(self, engine) -> tuple[int, dict | None]:
        """Restore the newest intact complete checkpoint into `engine` (every rank): (step, run state), or (0, None)."""
        tag = self.choose()
        if tag is None:
            return 0, None
        folder = self.root / tag
        state = json.loads((folder / "state.json").read_text())
        if state.get("format_version") != FORMAT_VERSION:
            raise PipelineError(
                f"checkpoint {folder} has format {state.get('format_version')!r}, this version reads "
                f"{FORMAT_VERSION}: delete the checkpoints folder to start over"
            )
        engine.load_trainable_state(load_file(str(folder / TENSORS)), state["step"])
        if state["world_size"] != distributed.world_size() and distributed.rank() == 0:
            log.warning(
                "resuming a checkpoint written on %d ranks on %d ranks: the data order and schedule continue "
                "by global step; dropout masks differ from an uninterrupted run on %d ranks",
                state["world_size"],
                distributed.world_size(),
                distributed.world_size(),
            )
        return int(state["step"]), state["run_state"]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def restore_history(path: Path, start: int, rank: int) -> list[dict]:
    """The training records of `metrics.jsonl` up to the resumed step `start` (a crash may have logged past the last
    checkpoint); rank 0 rewrites the file with only those, so the resumed job appends where the checkpoint left."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
        if record["step"] <= start:
            kept.append(record)
    if rank == 0:
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept
