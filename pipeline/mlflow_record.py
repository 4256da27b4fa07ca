"""What a recipe and its jobs show in MLflow: run names, params, tags, lineage, the parent's note, the curves'
names, what is logged after a job, and where to look in the UI. Pure functions of the plan and of a job's results
(some read an adapter's adapter_config.json or a folder's size); `Tracker` (tracking.py) sends what they return and
runner.py decides when.

    experiment   named dept-<recipe> (or tracking.experiment); its description is the recipe's `description`
    parent run   named after the recipe; tags `parent_tags`; note `parent_note` (the summary table once done);
                 metrics `summary.aggregates`; artifacts recipe.resolved.yaml, summary.json/.md/.png
    child run    one per job, named by `run_names`; params `job_params` (what its method reads) and, once it ran,
                 `outcome_params`; tags `job_tags` and `lineage_tags`; curves from the training loop through
                 `split_record`; `outcome` lists the rest (test score, best step, results.json, curves.png,
                 adapters, a saved backbone)

Values: params are flattened with dots (`flatten_params`), None is never a value, metric names carry no '/'.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import METHOD_FIELDS
from pipeline.options import to_dict

if TYPE_CHECKING:
    from pipeline.recipe import Job, Recipe

log = logging.getLogger(__name__)

MAX_PARAM_LEN = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY_LEN = 250
_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")


# ----------------------------------------------------------------------------------------------- keys and notes


def recipe_key(recipe: Recipe) -> str:
    """The parent run's identity (tag dept.key): the same recipe in the same output directory re-attaches to it."""
    return hashlib.sha256(f"{recipe.name}|{recipe.output_dir.resolve()}".encode()).hexdigest()[:16]


def child_key(recipe_key: str, job: Job, digest: str) -> str:
    """A job's run identity: its place in the recipe and its fingerprint (changed settings: a new run)."""
    place = re.sub(r"[^\w.:=+-]", "_", job.key.replace("/", "."))  # a sweep trial's "a=1,b=2": "a=1_b=2"
    return f"{recipe_key}-{place}-{digest[:8]}"


def parent_tags(recipe: Recipe, jobs: list[Job], world_size: int) -> dict[str, str]:
    """The parent run's tags when it starts (its note says the summary table comes when the jobs are done)."""
    return {
        "dept.recipe": recipe.name,
        "dept.jobs": str(len(jobs)),
        "dept.world_size": str(world_size),
        "dept.output_dir": str(recipe.output_dir.resolve()),
        "mlflow.note.content": parent_note(recipe, jobs, None),
    }


def parent_note(recipe: Recipe, jobs: list[Job], summary: dict | None) -> str:
    """The parent run's description in the MLflow UI (markdown): the recipe's description and, once every job
    is done, the summary table."""
    lines = [recipe.spec.description.strip()] if recipe.spec.description.strip() else []
    if summary is None:
        lines.append(f"Running {len(jobs)} jobs; the summary table appears here when they are done.")
    else:
        # The UI shows a description's first lines only: the first says where the rest is (#22).
        lines.insert(
            0,
            f'**Summary of {len(jobs)} jobs below** ("Show more" unfolds it; also `summary.md` and '
            "`summary.png` under Artifacts).",
        )
        lines += [
            summary["markdown"].strip(),
            "Pictures: `summary.png` (artifacts of this run) and `curves.png` in each child run. The table's "
            "cells are this run's metrics `<target>.k<k>.<start>.mean` / `.std`.",
        ]
    return "\n\n".join(lines)


# ----------------------------------------------------------------------------------------------- jobs


def run_names(jobs: list[Job]) -> dict[str, str]:
    """The MLflow run name of each job: what differs between the jobs of a stage comes first, in the order k, seed,
    start, target, so that the runs table's narrow name column (about 20 characters) tells rows apart: "k=4 seed=1
    source syn-target-food"; with several targets and one k and seed, "syn-target-vehicle k=4 seed=1 source"; the
    method last, in brackets, when transfer stages of several methods run side by side ("k=8 seed=1 stories-had
    source (pt)"). Train jobs: "<stage>: <tasks>". The stage is a tag. #22"""
    names = {}
    methods = {j.config.method for j in jobs if j.meta["type"] == "transfer"}
    order = ("k", "seed", "start", "target")
    for job in jobs:
        if job.meta["type"] == "train":
            names[job.key] = job.name
            continue
        peers = [j for j in jobs if j.stage == job.stage]
        parts = {
            "k": f"k={job.meta['k']}",
            "seed": f"seed={job.meta['seed']}",
            "start": str(job.meta["start"]),
            "target": str(job.meta["target"]),
        }
        varying = [f for f in order if len({str(j.meta[f]) for j in peers}) > 1]
        constant = [f for f in order if f not in varying]
        name = " ".join(parts[f] for f in varying + constant)
        names[job.key] = f"{name} ({job.config.method})" if len(methods) > 1 else name
    return names


def job_params(job: Job) -> dict:
    """The MLflow params of a job as configured: what its method reads (config.METHOD_FIELDS: no backbone lr on
    DePT/PT jobs, no prompt shape or prompt learning rates on finetune jobs), only fields the job's fingerprint covers (a param cannot
    change when a finished job is re-attached; logging and checkpoint cadence are tags), None left out. What is
    known only once the job ran (resolved shape, d, trainable parameters) is added by `outcome_params`."""
    cfg = to_dict(job.config)
    train, dept, data = cfg["train"], cfg["dept"], cfg["data"]
    method = cfg["method"]
    params = {
        "method": method,
        "model": cfg["model"],
        "ds_config": cfg["ds_config"],
        "batch_size": train["batch_size"],
        "grad_accum": train["grad_accum"],
        "steps": train["steps"],
        "warmup_steps": train["warmup_steps"],
        "seed": train["seed"],
        "weight_decay": train["weight_decay"],
        "grad_clip": train["grad_clip"],
        "max_train_rows": data["max_train_rows"],
    }
    if job.meta["type"] == "train":
        params["tasks"] = ",".join(map(str, job.meta["tasks"])) or None
        if len(data["tasks"]) > 1:
            params["mixture_cap"] = data["mixture_cap"]
    else:
        params.update(target=job.meta["target"], k=data["k"], start=job.meta["start"])
    if data["evaluate"]:
        params.update(eval_every=train["eval_every"], eval_mode=data["eval_mode"], max_eval_rows=data["max_eval_rows"])
        if data["eval_mode"] == "generate":
            params["max_new_tokens"] = data["max_new_tokens"]
    else:
        params["evaluate"] = False
    for flag in ("pad_to_max_length", "group_by_length"):
        if train[flag]:
            params[flag] = True
    params["max_length"] = dept["max_length"]  # every method's tokenized length (DePT: also the rows of A)
    for path in sorted(METHOD_FIELDS[method]):  # what only some methods read: this one's
        value = cfg[path[0]] if len(path) == 1 else cfg[path[0]][path[1]]
        if isinstance(value, dict):  # a whole section (lora): one param per field, `lora.r`, ...
            params.update({f"{path[0]}.{k}": ",".join(v) if isinstance(v, list) else v for k, v in value.items()})
        else:
            params[path[-1]] = value
    if method in ("dept", "pt"):
        if dept["prompt_init"] != "TEXT" or cfg["init_adapter"]:
            params.pop("init_text")  # the prompt comes from an adapter or from no text
        if not cfg["init_adapter"]:
            params.pop("on_length_mismatch")
    for key, value in job.meta.get("sweep", {}).items():  # a sweep's trial: its swept values under stable names,
        params[f"sweep.{key}"] = value  # the columns of MLflow's parallel-coordinates chart (#19)
    return {k: v for k, v in params.items() if v is not None}


def outcome_params(result: dict) -> dict:
    """Params known once a job ran: trainable and total parameter counts; for prompt methods the resolved shape
    (m, r, s: from the recipe, else the init adapter, else the defaults) and the backbone's width d; the hub
    revision of each hub dataset it read."""
    params = {"trainable_params": result.get("trainable_params"), "total_params": result.get("total_params")}
    shape = result.get("dept_shape") or {}
    if shape:
        params.update(
            num_virtual_tokens=shape.get("num_virtual_tokens"),
            max_length=shape.get("max_length"),
            d_model=shape.get("d_model"),
        )
        if result.get("config", {}).get("method") == "dept":
            params["r"] = shape.get("r")
    lora = result.get("lora_shape") or {}
    if lora:  # the resolved LoRA: r (also when a budget chose it), alpha, targets, input length
        params.update(
            {
                "lora.r": lora.get("r"),
                "lora.alpha": lora.get("alpha"),
                "lora.target_modules": ",".join(lora.get("target_modules") or []),
                "max_length": lora.get("max_length"),
                "d_model": lora.get("d_model"),
            }
        )
    for task, revision in sorted((result.get("data_revisions") or {}).items()):
        params[f"data_revision.{task}"] = revision  # the hub commit read ("main": unpinned)
    return {k: v for k, v in params.items() if v is not None}


def job_tags(job: Job, digest: str, world_size: int) -> dict[str, str]:
    """Tags of a job's run: its stage and place in the plan, the world size (a job may resume on another one, a
    param could not change), cadences that do not change results."""
    meta = {
        k: (",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v))
        for k, v in job.meta.items()
        if not isinstance(v, dict)  # a trial's swept values are params (`job_params`)
    }
    return {
        "dept.stage": job.stage,
        "dept.fingerprint": digest,
        "dept.world_size": str(world_size),
        "dept.job": job.key,
        "dept.output_dir": str(Path(job.config.output_dir).resolve()),
        "dept.log_every": str(job.config.train.log_every),
        "dept.save_every": (
            f"every {job.config.train.save_every_minutes:g} min"
            if job.config.train.save_every is None
            else str(job.config.train.save_every)
        ),
        **{f"dept.{k}": v for k, v in meta.items()},
    }


def adapter_artifact(adapter_dir: str | Path) -> str:
    """The artifact path under which a job's run holds the adapter in `adapter_dir` (`<job>/adapter` or
    `<job>/best_adapter`): `best_adapter` is not logged when it has the same weights as `adapter` (the sha256 its
    adapter_config.json records)."""
    adapter_dir = Path(adapter_dir)
    if adapter_dir.name == "best_adapter" and _same_weights(adapter_dir, adapter_dir.parent / "adapter"):
        return "adapter"
    return adapter_dir.name


def _same_weights(a: Path, b: Path) -> bool:
    first = _weights_sha256(a)
    return bool(first) and first == _weights_sha256(b)


def _weights_sha256(adapter_dir: Path) -> str | None:
    """The weights checksum an adapter records: in adapter_config.json (DePT, PT), or beside PEFT's files in
    dept_adapter.json (LoRA)."""
    for name in ("adapter_config.json", "dept_adapter.json"):
        try:
            sha = json.loads((Path(adapter_dir) / name).read_text()).get("weights_sha256")
        except (OSError, json.JSONDecodeError):
            continue
        if sha:
            return sha
    return None


def lineage_tags(job: Job, jobs: list[Job], run_ids: dict[str, str | None]) -> dict[str, str]:
    """Where a job starts from, by MLflow run id: the run that produced its init (source) adapter and the run of
    the finetune stage that saved its backbone, with `runs:/<id>/<path>` URIs a client can download from."""
    tags: dict[str, str] = {}
    init = job.config.init_adapter
    if job.init_from_stage:
        source = next((j for j in jobs if j.stage == job.init_from_stage and j.meta["type"] == "train"), None)
        tags["dept.source_stage"] = job.init_from_stage
        artifact = adapter_artifact(init) if init else None
        if source is not None and "trial" in source.meta:  # a swept stage: its winning trial (sweep.finish_stage)
            best = _read_json(Path(init).parent / "best.json")
            source = next((j for j in jobs if j.key == best.get("winner")), None)
            if source is not None:
                tags["dept.source_trial"] = source.key
                artifact = adapter_artifact(Path(source.config.output_dir) / "best_adapter")
        run_id = run_ids.get(source.key) if source else None
        if run_id:
            tags["dept.source_run_id"] = run_id
            tags["dept.source_adapter"] = f"runs:/{run_id}/{artifact}"
    if init:
        tags["dept.init_adapter_path"] = str(Path(init).resolve())
        sha = _weights_sha256(Path(init))
        if sha:
            tags["dept.init_adapter_sha256"] = sha
    model = Path(job.config.model).expanduser()
    for producer in jobs:
        if (
            producer.config.save_model
            and producer.meta["type"] == "train"
            and (Path(producer.config.output_dir) / "model").resolve() == model.resolve()
        ):
            tags["dept.backbone_stage"] = producer.stage
            run_id = run_ids.get(producer.key)
            if run_id:
                tags["dept.backbone_run_id"] = run_id
                if _model_fits(model):
                    tags["dept.backbone"] = f"runs:/{run_id}/model"
    return tags


def sweep_tags(summary: dict) -> dict[str, str]:
    """The parent run's tags naming each swept stage's winning trial (`dept.sweep.<stage>.winner`)."""
    tags = {}
    for table in summary.get("sweeps") or []:
        if table["winner"]:
            tags[safe_name(f"dept.sweep.{table['stage']}.winner")] = table["winner"]
            tags[safe_name(f"dept.sweep.{table['stage']}.trials")] = str(len(table["trials"]))
    return tags


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _model_fits(model_dir: Path) -> bool:
    """Whether a saved backbone is small enough to log as an artifact (DEPT_MLFLOW_MAX_MODEL_MB, default 2048)."""
    limit_mb = float(os.environ.get("DEPT_MLFLOW_MAX_MODEL_MB", "2048"))
    if not model_dir.is_dir():
        return False
    size = sum(p.stat().st_size for p in model_dir.rglob("*") if p.is_file())
    return size <= limit_mb * 2**20


@dataclass
class Outcome:
    """What a job's run receives once the job ran (`outcome`)."""

    params: dict
    metrics: dict
    step: int
    artifacts: list[Path] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)


def logged_records(result: dict) -> list[tuple[int, dict]]:
    """The (step, record) pairs a job's training loop handed its callbacks, rebuilt from its results.json: the
    training records (`history`), each validation (`eval_` + metric) and the test at the best step (`test_` +
    metric). For a run created after its job ran (the tracking server did not answer when it started, #21)."""

    def numeric(metrics: dict, prefix: str) -> dict:
        return {
            f"{prefix}{k}": v
            for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
        }

    records = [(int(r["step"]), r) for r in result.get("history") or []]
    records += [(int(e["step"]), numeric(e, "eval_")) for e in result.get("evals") or []]
    if result.get("test"):
        records.append((int(result.get("best_step") or 0), numeric(result["test"], "test_")))
    return records


def outcome(job: Job, result: dict, run_id: str) -> Outcome:
    """After a job: the resolved params, the reported test score at the best step, the best step, curves.png,
    results.json, adapters (best_adapter only when its weights differ from the final adapter's) and a backbone
    saved by a finetune stage (by path only when over DEPT_MLFLOW_MAX_MODEL_MB)."""
    out = Path(job.config.output_dir)
    metrics = {}
    if isinstance(result.get("test_score"), (int, float)):  # the score the summary reports, at the best step
        metrics["test_score"] = round(result["test_score"], 4)
    tags = {"dept.best_step": str(result.get("best_step"))} if result.get("best_step") is not None else {}
    if "trial" in job.meta:  # a sweep's trial: the score it is compared on, and whether its pruner stopped it
        if isinstance(result.get("best_validation"), (int, float)):
            metrics["sweep.val_score"] = round(result["best_validation"], 4)
        tags["dept.pruned"] = "true" if result.get("stopped_early") else "false"
    artifacts = [out / item for item in ("results.json", "curves.png", "adapter") if (out / item).exists()]
    if (out / "best_adapter").is_dir():
        tags["dept.best_adapter"] = adapter_artifact(out / "best_adapter")
        if tags["dept.best_adapter"] == "best_adapter":
            artifacts.append(out / "best_adapter")
    if job.config.save_model and (out / "model").is_dir():
        if _model_fits(out / "model"):
            artifacts.append(out / "model")
            tags["dept.model"] = f"runs:/{run_id}/model"
        else:
            log.warning(
                "%s: the saved backbone %s is over DEPT_MLFLOW_MAX_MODEL_MB; recorded by path only",
                job.key,
                out / "model",
            )
        tags["dept.model_path"] = str((out / "model").resolve())
    return Outcome(outcome_params(result), metrics, result.get("best_step") or 0, artifacts, tags)


def ui_hint(uri: str, experiment_id: str | None, parent_id: str | None, port: int = 5000) -> str:
    """Where to look. MLflow 3 opens an experiment on its GenAI pages (traces: "No data available"); the runs are
    at `#/experiments/<id>/runs?workflowType=machine_learning`. A server URI is linked directly (credentials
    left out); a database store first needs a UI started on it."""
    parsed = urllib.parse.urlparse(uri)
    lines = ["MLflow: this recipe's runs (parent run with the summary table and one child run per job):"]
    if parsed.scheme.lower() in ("http", "https"):
        netloc = parsed.hostname or ""
        if ":" in netloc:  # an IPv6 address
            netloc = f"[{netloc}]"
        if parsed.port:
            netloc += f":{parsed.port}"
        base = urllib.parse.urlunparse((parsed.scheme, netloc, parsed.path.rstrip("/"), "", "", ""))
    else:
        base = f"http://127.0.0.1:{port}"
        lines.append(
            f"  start the UI:  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --backend-store-uri {uri} "
            f"--host 127.0.0.1 --port {port} --workers 1"
        )
    lines.append(f"  runs:          {base}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    if parent_id:
        # MLflow 3.17's UI picks its layout from the workflowType parameter (its GenAI/Model training toggle),
        # also on a run's page: without it the parent opened in the GenAI layout ("Evaluations"). #22
        lines.append(
            f"  parent run:    {base}/#/experiments/{experiment_id}/runs/{parent_id}?workflowType=machine_learning"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- values


def _param_value(value: Any) -> str:
    if isinstance(value, (list, tuple, set)):
        text = json.dumps(sorted(value) if isinstance(value, set) else list(value), default=str)
    else:
        text = str(value)
    return text if len(text) <= MAX_PARAM_LEN else text[: MAX_PARAM_LEN - 3] + "..."


def safe_name(key: str) -> str:
    """A valid MLflow param/metric/tag name: bad characters become '_', length capped."""
    return _BAD_NAME_CHARS.sub("_", str(key))[:MAX_KEY_LEN] or "_"


def flatten_params(params: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}, "c": [1, 2], "d": None} -> {"a.b": "1", "c": "[1, 2]"}: what MLflow stores as params.

    None is left out (never the string "None"): an unset option is no parameter value.
    """
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if value is None:
            continue
        if isinstance(value, dict) and value:
            out.update(flatten_params(value, name))
        else:
            out[safe_name(name)] = _param_value(value)
    return out


def metric_name(key: str) -> str:
    """A metric name the MLflow UI shows as one chart: no '/' (the UI would make a chart section of the prefix)."""
    return safe_name(str(key).replace("/", "_"))


def split_record(record: dict, invalid_curves: bool = False) -> tuple[dict[str, float], dict[str, str]]:
    """A training-loop record as (metrics to plot, tags).

    `step` is the x axis, not a metric. Counts that do not change over a run (`eval_n`, `test_n`, per task
    `eval_<task>.n`) and the test split's invalid-output count become tags (`dept.test_n`, ...), as do
    `eval_*invalid` counts unless `invalid_curves` (generation can produce invalid outputs, and fewer over training
    is a curve worth seeing; label scoring never does). Selection scores that repeat one of the metrics next to
    them are dropped: a task's `<task>.score` in a mixture, and `test_score` (the caller logs the score it reports,
    which may be another metric than the one the best step was selected on); `eval_score`, the selection curve,
    stays. Scores (`eval_*`, `test_*`) are rounded to 4 decimals, so 55.00000000000001 reads 55.0. Non-numbers are
    dropped.
    """
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    for key, value in record.items():
        if key == "step":
            continue
        number = numeric(value)
        if number is None:
            continue
        leaf = str(key).rsplit(".", 1)[-1].removeprefix("eval_").removeprefix("test_")
        scored = str(key).startswith(("eval_", "test_"))
        if scored and leaf == "score" and key != "eval_score":
            continue
        if scored and (leaf == "n" or (leaf == "invalid" and (key.startswith("test_") or not invalid_curves))):
            tags[safe_name(f"dept.{metric_name(key)}")] = f"{number:g}"
            continue
        metrics[metric_name(key)] = round(number, 4) if scored and math.isfinite(number) else number
    return metrics, tags


def numeric(value: Any) -> float | None:
    if isinstance(value, (str, bytes)) or value is None:
        return None
    try:
        return float(value)  # int, float, bool, numpy scalars, 0-d torch tensors
    except (TypeError, ValueError):
        return None
