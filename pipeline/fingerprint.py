"""What decides a job's result, as one digest: a finished job is reused, and an unfinished one resumed, only when
the digest of the job as configured now equals the one it was started with.

The fingerprint covers the resolved job config (minus what cannot change the result: output directory, logging and
checkpoint cadence, communication timeout, evaluation batch size), the identity of its data (local files by
content, hub datasets by id, config and revision), of its starting points (the init adapter's weights, a local
model directory's files) and the code policy: the package's major.minor version. Commits within one version reuse
each other's results (the commit is recorded, not compared); a new minor version recomputes. The number of ranks
is not part of it: a job may resume on another world size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.config import METHODS, JobConfig, unread_fields
from pipeline.options import to_dict
from pipeline.tasks.tables import file_digest

NOT_RESULT_DEFINING = {
    ("output_dir",),
    ("train", "allow_fp16_t5"),  # permission only: the DeepSpeed config decides the precision
    ("train", "log_every"),
    ("train", "save_every"),
    ("train", "save_every_minutes"),
    ("train", "keep_checkpoints"),
    ("train", "comm_timeout_s"),
    ("train", "cpu_threads"),
    ("train", "sharding"),  # ZeRO-3 or the whole model: the same steps (tests/test_batch_split.py)
    ("data", "eval_batch_size"),
    ("data", "data_dir"),
}
# Fields pt does not read (r is 0, budget_tokens is refused, the scale of a missing pair is 0) that its fingerprint has
# always covered: kept, so that finished pt jobs are still reused; drop this at the next fingerprint version.
STILL_FINGERPRINTED = {"pt": {("dept", "r"), ("dept", "budget_tokens"), ("dept", "lora_alpha")}}
# Fields a method never reads (config.METHOD_FIELDS): changing them does not change its result.
UNUSED_BY = {method: unread_fields(method) - STILL_FINGERPRINTED.get(method, set()) for method in METHODS}


def code_version() -> str:
    """major.minor of the code that runs (not of the installed metadata, which an editable install freezes)."""
    from pipeline._version import __version__

    return ".".join(__version__.split(".")[:2])


def _folder_identity(folder: Path, pattern: str = "*") -> dict[str, str]:
    return {p.name: file_digest(p) for p in sorted(folder.glob(pattern)) if p.is_file()}


def _model_identity(model: str) -> object:
    """Hub names and presets by name; a local directory by its files' sizes and times (weights can be GBs)."""
    path = Path(model).expanduser()
    if not path.is_dir():
        return model
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(path.iterdir()) if p.is_file()}


def data_identity(cfg: JobConfig) -> list:
    from pipeline.tasks import local_task_folder
    from pipeline.tasks.specs import task_from_spec

    if cfg.data.train_file:
        return [{"file": file_digest(cfg.data.train_file)}]
    out = []
    for spec in cfg.data.tasks:
        task = task_from_spec(spec)
        if task.data_files:
            out.append({"task": spec, "files": {split: file_digest(path) for split, path in task.data_files}})
        elif task.hub_path is None:  # generated (synthetic) tasks: the code version covers them
            out.append({"task": task.name})
        elif (folder := local_task_folder(task, cfg.data.data_dir)) is not None:
            out.append({"task": task.name, "files": _folder_identity(folder)})
        else:
            out.append({"task": task.name, "hub": [task.hub_path, task.hub_config, task.revision]})
    return out


def _drop(config: dict, paths) -> dict:
    config = json.loads(json.dumps(config))
    for path in paths:
        node = config
        for part in path[:-1]:
            node = node.get(part, {})
        node.pop(path[-1], None)
    return config


def job_fingerprint(cfg: JobConfig) -> tuple[str, dict]:
    """(digest, the fingerprinted record): compare records to name the keys that differ."""
    record = {
        "config": _drop(to_dict(cfg), NOT_RESULT_DEFINING | UNUSED_BY[cfg.method]),
        "data": data_identity(cfg),
        "model": _model_identity(cfg.model),
        "code": code_version(),
    }
    if cfg.init_adapter and Path(cfg.init_adapter).is_dir():
        record["init_adapter"] = _folder_identity(Path(cfg.init_adapter), "adapter_model.*")
    digest = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return digest, record


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two fingerprint records."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        where = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += differences(a, b, where)
        elif a != b:
            keys.append(where)
    return keys


JOB_RECORD = "job.json"  # written when a job starts training: its fingerprint and record


def recorded_state(cfg: JobConfig) -> tuple[str, list[str]]:
    """What `cfg.output_dir` holds for this job: ("new" | "finished" | "resumable" | "changed", differing keys).

    finished: results.json with this job's fingerprint. resumable: a complete checkpoint of a job started with this
    fingerprint. changed: either of those, started with other settings (the keys name what differs). new: nothing
    that counts (a folder without results or a complete checkpoint is started over).
    """
    out = Path(cfg.output_dir)
    results, record_file, latest = out / "results.json", out / JOB_RECORD, out / "checkpoints" / "latest"
    checkpointed = latest.is_file() and (out / "checkpoints" / latest.read_text().strip() / "complete").exists()
    if not results.exists() and not checkpointed:
        return "new", []
    digest, record = job_fingerprint(cfg)
    try:
        old = json.loads(record_file.read_text()) if record_file.exists() else {}
    except json.JSONDecodeError:
        old = {}
    if results.exists():
        try:
            finished_with = json.loads(results.read_text()).get("fingerprint")
        except json.JSONDecodeError:
            finished_with = None
        if finished_with == digest:
            return "finished", []
    elif old.get("fingerprint") == digest:
        return "resumable", []
    return "changed", differences(old.get("record", {}), record) or ["(recorded by an older version)"]
