"""Recipes: a YAML file of stages (source pretraining -> few-shot transfer), validated and expanded into runs.

    name: fewshot_small
    model: t5-base                      # hub name, local dir, random:<preset>, or stage:<name> (a finetune stage's model)
    ds_config: ds_configs/zero3_gpu_bf16.json
    output_dir: runs/fewshot_small
    dept: {num_virtual_tokens: 60, r: 30, max_length: 256}
    train: {batch_size: 32, steps: 1000, lr_prompt: 0.3, lr_lowrank: 1e-4}   # any TrainConfig field
    data: {eval_mode: score, max_eval_rows: 500}                             # any DataSpec field
    tracking: {experiment: dept, uri: null}
    stages:
      - {name: source, type: train, tasks: [mnli, qnli]}
      - {name: transfer, type: transfer, source: source, targets: [rte, cb], k: [4, 16, 32], seeds: [1, 2, 3]}

Command-line overrides beat the file: `dept run recipe.yaml --train.steps=10 --stages.transfer.k=[4]`
(stages addressed by name or index). Unknown keys and wrong types are refused with the key's path named.
Nothing here trains: `plan()` turns a recipe into a list of `Run`s that `runner.py` executes.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path

import yaml

from pipeline.errors import PipelineError
from pipeline.stage import DataSpec
from pipeline.train import TrainConfig

STAGE_TYPES = ("train", "transfer")
LENGTH_POLICIES = ("error", "truncate", "pad")
DEPT_KEYS = ("num_virtual_tokens", "r", "max_length", "lora_alpha", "prompt_init", "init_text")
RUN_LEVEL_KEYS = ("model", "output_dir", "ds_config", "init_adapter", "method", "save_model",
                  "on_length_mismatch")  # set by the plan from recipe/stage keys


@dataclass
class TrackingSpec:
    enabled: bool = field(default=True, metadata={"help": "log to MLflow (rank 0 only)"})
    uri: str | None = field(default=None, metadata={"help": "MLflow URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db"})
    experiment: str = field(default="dept", metadata={"help": "MLflow experiment name"})


@dataclass
class StageSpec:
    name: str = field(metadata={"help": "unique stage name; also its output subdirectory"})
    type: str = field(default="train", metadata={"help": "train | transfer"})
    method: str | None = field(default=None, metadata={"help": "dept | pt | finetune (default: the recipe's)"})
    model: str | None = field(default=None, metadata={"help": "backbone for this stage (default: the recipe's)"})
    tasks: list = field(default_factory=list, metadata={"help": "train: task names / custom task dicts"})
    init_adapter: str | None = field(default=None, metadata={"help": "train: start from this adapter (path or stage:<name>)"})
    save_model: bool = field(default=False, metadata={"help": "finetune: save the trained backbone for stage:<name>"})
    source: str | None = field(default=None, metadata={"help": "transfer: the stage (or adapter path) to start from"})
    targets: list = field(default_factory=list, metadata={"help": "transfer: target tasks"})
    k: list = field(default_factory=lambda: [4, 16, 32], metadata={"help": "transfer: k-shot sizes"})
    seeds: list = field(default_factory=lambda: [1, 2, 3], metadata={"help": "transfer: seeds per (target, k)"})
    control: bool = field(default=False, metadata={"help": "transfer: also train from scratch at each (target, k, seed)"})
    on_length_mismatch: str = field(default="error", metadata={"help": "source s != this s: error | truncate | pad A"})
    train: dict = field(default_factory=dict, metadata={"help": "TrainConfig fields for this stage"})
    data: dict = field(default_factory=dict, metadata={"help": "DataSpec fields for this stage"})


@dataclass
class Recipe:
    name: str
    model: str
    output_dir: str
    stages: list
    ds_config: str = "ds_configs/zero3_cpu.json"
    method: str = "dept"
    dept: dict = field(default_factory=dict)
    train: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    description: str = ""


@dataclass
class Run:
    """One training run of the plan."""

    stage: str
    key: str  # stable identity (directory-relative), e.g. "transfer/rte/k16/seed2/transfer"
    train: TrainConfig
    data: DataSpec
    meta: dict  # stage type, target, k, seed, variant (transfer | control)
    init_from_stage: str | None = None  # its init adapter comes from that stage's output


# -- loading and validation --------------------------------------------------------------------------------

def _check_value(value, annotation: str, path: str):
    """Check a YAML value against a dataclass field's annotation (as a string: `from __future__` annotations)."""
    ann = annotation.replace(" ", "")
    optional = "None" in ann
    if value is None:
        if optional:
            return None
        raise PipelineError(f"{path}: null is not allowed here; give a value")
    base = ann.replace("|None", "").replace("None|", "")
    checks = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "dict": (dict,), "list": (list,),
              "dict|None": (dict,)}
    if base in checks:
        wanted = checks[base]
        ok = isinstance(value, wanted) and not (base in ("int", "float") and isinstance(value, bool))
        if not ok:
            raise PipelineError(f"{path}: expected {base}, got {type(value).__name__} {value!r}")
        return float(value) if base == "float" else value
    return value


def _build(cls, raw, path: str):
    """A dataclass from a dict, naming the path of any unknown key, missing key or wrong type."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise PipelineError(f"{path}.{unknown[0]}: unknown key; known keys: {', '.join(known)}")
    values = {}
    for name, spec in known.items():
        if name in raw:
            values[name] = _check_value(raw[name], str(spec.type), f"{path}.{name}")
        elif spec.default is MISSING and spec.default_factory is MISSING:
            raise PipelineError(f"{path}.{name}: required key is missing")
    return cls(**values)


def _check_section(raw: dict, cls, path: str, exclude=()) -> dict:
    """Validate a free dict section whose keys must be fields of `cls` (TrainConfig, DataSpec)."""
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: expected a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in fields(cls) if f.name not in exclude}
    for key, value in raw.items():
        if key not in known:
            raise PipelineError(f"{path}.{key}: unknown key; known keys: {', '.join(known)}")
        raw[key] = _check_value(value, str(known[key].type), f"{path}.{key}")
    return raw


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """Set dotted keys (`train.steps`, `stages.transfer.k`, `stages.0.tasks`) in the raw recipe."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        parts = str(dotted).split(".")
        node = raw
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = _stage_by_name_or_index(node, part, where)
            else:
                if part not in node:
                    node[part] = {}
                node = node[part]
                if not isinstance(node, (dict, list)):
                    raise PipelineError(f"override --{dotted}: {where} is not a section")
        last = parts[-1]
        if isinstance(node, list):
            raise PipelineError(f"override --{dotted}: name a key inside the stage (e.g. --{dotted}.steps=...)")
        node[last] = value
    return raw


def _stage_by_name_or_index(stages: list, part: str, where: str) -> dict:
    if part.isdigit() and int(part) < len(stages):
        return stages[int(part)]
    for stage in stages:
        if isinstance(stage, dict) and stage.get("name") == part:
            return stage
    names = [s.get("name") for s in stages if isinstance(s, dict)]
    raise PipelineError(f"override {where}: no stage {part!r} (stages: {', '.join(map(str, names))})")


def load_recipe(path: str, overrides: dict | None = None) -> Recipe:
    file = Path(path)
    if not file.is_file():
        raise PipelineError(f"recipe {path} does not exist: pass a YAML file (see recipes/)")
    try:
        raw = yaml.safe_load(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"recipe {path}{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    return validate(apply_overrides(raw or {}, overrides or {}))


def validate(raw: dict) -> Recipe:
    """Check every key and value, cross-check stage references; returns the Recipe."""
    raw = dict(raw)
    raw["tracking"] = _build(TrackingSpec, raw.get("tracking", {}) or {}, "recipe.tracking")
    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise PipelineError("recipe.stages: give a non-empty list of stages")
    raw["stages"] = [_build(StageSpec, s, f"recipe.stages[{i}]") for i, s in enumerate(stages_raw)]
    recipe = _build(Recipe, raw, "recipe")
    dept = _check_section(recipe.dept, TrainConfig, "recipe.dept")
    if any(k not in DEPT_KEYS for k in dept):
        bad = next(k for k in dept if k not in DEPT_KEYS)
        raise PipelineError(f"recipe.dept.{bad}: not a DePT shape key; known keys: {', '.join(DEPT_KEYS)}")
    _check_section(recipe.train, TrainConfig, "recipe.train", exclude=RUN_LEVEL_KEYS)
    _check_section(recipe.data, DataSpec, "recipe.data", exclude=("tasks", "k"))
    seen = []
    for i, stage in enumerate(recipe.stages):
        path = f"recipe.stages[{i}] ({stage.name})"
        if stage.name in seen:
            raise PipelineError(f"{path}: duplicate stage name; give each stage its own name")
        if stage.type not in STAGE_TYPES:
            raise PipelineError(f"{path}.type: {stage.type!r} is not one of {', '.join(STAGE_TYPES)}")
        if stage.on_length_mismatch not in LENGTH_POLICIES:
            raise PipelineError(f"{path}.on_length_mismatch: choose one of {', '.join(LENGTH_POLICIES)}")
        _check_section(stage.train, TrainConfig, f"{path}.train", exclude=RUN_LEVEL_KEYS)
        _check_section(stage.data, DataSpec, f"{path}.data", exclude=("tasks", "k"))
        for ref_name, ref in (("model", stage.model), ("init_adapter", stage.init_adapter), ("source", stage.source)):
            if isinstance(ref, str) and ref.startswith("stage:"):
                ref = ref[len("stage:"):]
            elif ref_name != "source":
                continue
            if ref is not None and ref not in seen and not Path(ref).exists():
                raise PipelineError(f"{path}.{ref_name}: {ref!r} is not an earlier stage nor an existing path")
        if stage.type == "train" and not stage.tasks:
            raise PipelineError(f"{path}.tasks: a train stage needs at least one task")
        if stage.type == "transfer":
            if not stage.targets:
                raise PipelineError(f"{path}.targets: a transfer stage needs at least one target task")
            if stage.source is None and not stage.control:
                raise PipelineError(f"{path}.source: a transfer stage needs a source stage or adapter path")
            for name, values in (("k", stage.k), ("seeds", stage.seeds)):
                if not values or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
                    raise PipelineError(f"{path}.{name}: give a non-empty list of integers, got {values!r}")
        if stage.save_model and (stage.method or recipe.method) != "finetune":
            raise PipelineError(f"{path}.save_model: only a finetune stage changes the backbone; remove save_model")
        seen.append(stage.name)
    return recipe


# -- the plan ------------------------------------------------------------------------------------------------

def _stage_model(recipe: Recipe, stage: StageSpec) -> str:
    model = stage.model or recipe.model
    if model.startswith("stage:"):
        return str(Path(recipe.output_dir) / model[len("stage:"):] / "model")
    return model


def _train_config(recipe: Recipe, stage: StageSpec, output_dir: Path, seed: int | None, init_adapter: str | None) -> TrainConfig:
    values = {**recipe.dept, **recipe.train, **stage.train}
    if seed is not None:
        values["seed"] = seed
    values.update(model=_stage_model(recipe, stage), output_dir=str(output_dir), ds_config=recipe.ds_config,
                  method=stage.method or recipe.method, init_adapter=init_adapter,
                  save_model=stage.save_model, on_length_mismatch=stage.on_length_mismatch)
    return TrainConfig(**values)


def _adapter_of(recipe: Recipe, ref: str | None) -> tuple[str | None, str | None]:
    """(adapter path, stage it comes from) for `stage:<name>`, a bare stage name, or a path: the stage's best
    adapter on validation, or its last one when the stage does not evaluate."""
    if ref is None:
        return None, None
    name = ref[len("stage:"):] if ref.startswith("stage:") else ref
    stage = next((s for s in recipe.stages if s.name == name), None)
    if stage is None:
        return ref, None
    evaluates = {**recipe.data, **stage.data}.get("evaluate", True)
    return str(Path(recipe.output_dir) / name / ("best_adapter" if evaluates else "adapter")), name


def plan(recipe: Recipe) -> list[Run]:
    """Every run of the recipe, in execution order."""
    out = Path(recipe.output_dir)
    runs: list[Run] = []
    for stage in recipe.stages:
        data_defaults = {**recipe.data, **stage.data}
        if stage.type == "train":
            adapter, from_stage = _adapter_of(recipe, stage.init_adapter)
            cfg = _train_config(recipe, stage, out / stage.name, None, adapter)
            runs.append(Run(stage.name, stage.name, cfg, DataSpec(tasks=list(stage.tasks), **data_defaults),
                            {"type": "train", "tasks": [_task_label(t) for t in stage.tasks]}, from_stage))
            continue
        adapter, from_stage = _adapter_of(recipe, stage.source)
        variants = ([("transfer", adapter)] if stage.source else []) + ([("control", None)] if stage.control else [])
        for target in stage.targets:
            for k in stage.k:
                for seed in stage.seeds:
                    for variant, init in variants:
                        key = f"{stage.name}/{_task_label(target)}/k{k}/seed{seed}/{variant}"
                        cfg = _train_config(recipe, stage, out / key, seed, init)
                        data = DataSpec(tasks=[target], k=k, **data_defaults)
                        meta = {"type": "transfer", "target": _task_label(target), "k": k, "seed": seed,
                                "variant": variant}
                        runs.append(Run(stage.name, key, cfg, data, meta, from_stage if init else None))
    return runs


def _task_label(task) -> str:
    return task["name"] if isinstance(task, dict) else str(task)


def fingerprint(recipe: Recipe) -> str:
    """Identity of a recipe execution (its output directory and name): re-runs re-attach to the same MLflow runs."""
    return hashlib.sha256(f"{recipe.name}|{Path(recipe.output_dir).resolve()}".encode()).hexdigest()[:16]


def resolved_dict(recipe: Recipe) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(recipe), default=str))
