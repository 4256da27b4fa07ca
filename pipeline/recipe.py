"""Recipes: a YAML file of stages (source pretraining -> few-shot transfer), validated and expanded into jobs.

    name: fewshot_small
    model: t5-base                   # hub name, local dir, random:<preset>; a stage may say stage:<name>
    ds_config: zero3_gpu             # a shipped name, or a path relative to this file
    output_dir: runs/fewshot_small   # relative to the working directory
    dept: {num_virtual_tokens: 60, r: 30, max_length: 256}       # DeptArgs defaults (config.py)
    train: {batch_size: 32, steps: 1000, lr_prompt: 0.3}          # TrainArgs defaults
    data: {eval_mode: score, max_eval_rows: 500}                  # DataArgs defaults
    tracking: {experiment: dept-fewshot}
    stages:
      - {name: source, type: train, tasks: [mnli, qnli]}
      - {name: transfer, type: transfer, source: source, targets: [rte, cb], k: [4, 16, 32], seeds: [1, 2, 3]}

Which value wins, highest first: a command-line override (`--train.steps=100` sets every stage's steps;
`--stages.transfer.train.steps=40` one stage's), then the stage's own section, then the recipe's section, then the
defaults of config.py. Input paths in the file (ds_config, custom task data_files, init adapters, source adapters,
local models) resolve against the recipe's folder; output_dir against the working directory. Nothing here trains
or imports torch: `plan()` turns a recipe into `Job`s that runner.py executes, and `check_feasible()` refuses at the
start what would otherwise fail hours in.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from pipeline import distributed, sweep
from pipeline.config import SECTIONS, JobConfig, RecipeSpec, StageSpec, capped, unread_fields
from pipeline.errors import PipelineError
from pipeline.options import build, check_partial, did_you_mean, to_dict
from pipeline.resources import recipe_path

STAGE_DATA_KEYS = ("tasks", "k")  # set by a stage itself, not by a data section


@dataclass
class Recipe:
    spec: RecipeSpec
    path: Path  # the recipe file (inputs resolve against its folder)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def output_dir(self) -> Path:
        return Path(self.spec.output_dir)


@dataclass
class Job:
    """One job of the plan (one training run, one MLflow child run)."""

    stage: str
    key: str  # stable identity inside the recipe, e.g. "transfer/syn-target-food/k16/seed2/source"
    config: JobConfig
    meta: dict  # stage type, target, k, seed, start (source | scratch)
    init_from_stage: str | None = None  # its init adapter is that stage's output
    model_from_stage: str | None = None  # its model is that (finetune) stage's saved backbone

    @property
    def name(self) -> str:
        """A train job's MLflow run name, "<stage>: <tasks>" (transfer jobs are named by `mlflow_record.run_names`,
        which compares them with the other jobs of their stage)."""
        if "trial" in self.meta:  # a sweep's trial: its setting first (the runs table's name column is narrow)
            return f"{self.meta['trial']} {'+'.join(self.meta['tasks'])}"
        return f"{self.stage}: {'+'.join(self.meta['tasks'])}"


# ----------------------------------------------------------------------------------------------- loading


def read_yaml(path: Path) -> dict:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise PipelineError(f"recipe {path}{where} is not valid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"recipe {path} must be a mapping of keys (name, model, stages, ...)")
    return raw


def load_recipe(name_or_path: str, overrides: dict | None = None) -> Recipe:
    """A shipped recipe by name (`quickstart`) or a YAML path, with command-line overrides applied, validated."""
    path = recipe_path(name_or_path)
    raw = apply_overrides(read_yaml(path), overrides or {})
    return Recipe(validate(raw, path.parent), path)


def apply_overrides(raw: dict, overrides: dict) -> dict:
    """Set dotted keys (`train.steps`, `stages.transfer.k`, `stages.0.tasks`) in the raw recipe. A recipe-level
    section key (`train.steps`) also replaces the stages' own values: the command line wins over the file."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        parts = str(dotted).split(".")
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if parts[0] not in {f for f in RecipeSpec.__dataclass_fields__}:
            raise PipelineError(
                f"override --{dotted}: unknown recipe key {parts[0]!r}"
                f"{did_you_mean(parts[0], RecipeSpec.__dataclass_fields__)}"
            )
        node = raw
        for i, part in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                node = _stage_by_name_or_index(node, part, where)
                continue
            node = node.setdefault(part, {})
            if not isinstance(node, (dict, list)):
                raise PipelineError(f"override --{dotted}: {where} is not a section")
        if isinstance(node, list):
            raise PipelineError(f"override --{dotted}: name a key inside the stage (e.g. --{dotted}.train.steps=...)")
        node[parts[-1]] = value
        if len(parts) == 2 and parts[0] in SECTIONS:
            for stage in raw.get("stages") or []:
                if isinstance(stage, dict) and isinstance(stage.get(parts[0]), dict):
                    stage[parts[0]].pop(parts[1], None)
    return raw


def _stage_by_name_or_index(stages: list, part: str, where: str) -> dict:
    if part.isdigit() and int(part) < len(stages):
        return stages[int(part)]
    for stage in stages:
        if isinstance(stage, dict) and stage.get("name") == part:
            return stage
    names = [str(s.get("name")) for s in stages if isinstance(s, dict)]
    raise PipelineError(f"override {where}: no stage {part!r}{did_you_mean(part, names)} (stages: {', '.join(names)})")


def _absolute(value: str | None, base: Path, kind: str) -> str | None:
    """An input path relative to the recipe's folder, made absolute; names (hub models, shipped configs, stage
    references, presets) are left as they are."""
    if value is None or value.startswith(("stage:", "random:")) or Path(value).expanduser().is_absolute():
        return value
    looks_like_path = value.startswith((".", "~")) or (base / value).exists()
    if kind == "ds_config":
        looks_like_path = "/" in value or value.endswith(".json")
    return str((base / value).resolve()) if looks_like_path else value


def _resolve_inputs(spec: RecipeSpec, base: Path) -> RecipeSpec:
    from pipeline.tasks.specs import is_task_file, with_absolute_paths

    def task_list(specs):
        return [
            with_absolute_paths(t, base)
            if isinstance(t, dict)
            else str((base / t).resolve())
            if is_task_file(t) and not Path(t).is_absolute()
            else t
            for t in specs
        ]

    def data_section(section: dict) -> dict:
        out = dict(section)
        for key in ("data_dir", "train_file"):
            if out.get(key):
                out[key] = str((base / out[key]).resolve()) if not Path(out[key]).is_absolute() else out[key]
        return out

    stages = []
    for stage in spec.stages:
        source = stage.source
        if source is not None and not any(s.name == source.removeprefix("stage:") for s in spec.stages):
            source = _absolute(source, base, "adapter")
        stages.append(
            replace(
                stage,
                model=_absolute(stage.model, base, "model"),
                init_adapter=_absolute(stage.init_adapter, base, "adapter"),
                source=source,
                tasks=task_list(stage.tasks),
                targets=task_list(stage.targets),
                data=data_section(stage.data),
            )
        )
    return replace(
        spec,
        model=_absolute(spec.model, base, "model"),
        ds_config=_absolute(spec.ds_config, base, "ds_config"),
        data=data_section(spec.data),
        stages=stages,
    )


def validate(raw: dict, base: Path) -> RecipeSpec:
    """Every key and value checked (unknown keys with a "did you mean"), stage references cross-checked, input
    paths made absolute against `base` (the recipe's folder)."""
    spec = build(RecipeSpec, raw, "recipe")
    if not spec.stages:
        raise PipelineError("recipe.stages: give a non-empty list of stages")
    for name, cls in SECTIONS.items():
        exclude = STAGE_DATA_KEYS if name == "data" else ()
        section = getattr(spec, name)
        bad = [k for k in section if k in exclude]
        if bad:
            raise PipelineError(f"recipe.{name}.{bad[0]}: set by each stage (tasks, targets, k), not in a section")
        setattr(spec, name, check_partial(cls, section, f"recipe.{name}"))
    if spec.sweep is not None:  # every train stage without its own sweep gets the recipe's (e.g. --sweep paper)
        every = sweep.named(spec.sweep, "recipe.sweep")
        for stage in spec.stages:
            if stage.type == "train" and stage.sweep is None:
                stage.sweep = copy.deepcopy(every)
    seen: list[str] = []
    for i, stage in enumerate(spec.stages):
        path = f"recipe.stages[{i}] ({stage.name})"
        for name, cls in SECTIONS.items():
            section = getattr(stage, name)
            bad = [k for k in section if k in (STAGE_DATA_KEYS if name == "data" else ())]
            if bad:
                raise PipelineError(f"{path}.{name}.{bad[0]}: a stage sets {bad[0]} itself (tasks/targets, k)")
            setattr(stage, name, check_partial(cls, section, f"{path}.{name}"))
        if stage.name in seen:
            raise PipelineError(f"{path}: duplicate stage name; give each stage its own name")
        for key, ref in (("model", stage.model), ("init_adapter", stage.init_adapter), ("source", stage.source)):
            if isinstance(ref, str) and ref.startswith("stage:") and ref[len("stage:") :] not in seen:
                raise PipelineError(
                    f"{path}.{key}: {ref!r} is not an earlier stage (earlier: {', '.join(seen) or 'none'})"
                )
        if stage.type == "train":
            if not stage.tasks and not {**spec.data, **stage.data}.get("train_file"):
                raise PipelineError(f"{path}.tasks: a train stage needs at least one task")
            if stage.targets or stage.source:
                raise PipelineError(f"{path}: targets/source belong to a transfer stage; set type: transfer")
            if stage.sweep is not None:
                sweep.parse(stage.sweep, stage.method or spec.method, f"{path}.sweep")
                if not {**spec.data, **stage.data}.get("evaluate", True):
                    raise PipelineError(
                        f"{path}.sweep: a sweep picks its best trial on validation; remove evaluate: false"
                    )
                if stage.save_model:
                    raise PipelineError(
                        f"{path}.sweep: a swept stage hands on its best adapter, not a saved backbone; remove save_model"
                    )
        else:
            if not stage.targets:
                raise PipelineError(f"{path}.targets: a transfer stage needs at least one target task")
            if stage.source is None and not stage.control:
                raise PipelineError(f"{path}.source: a transfer stage needs a source stage or adapter path")
            if (
                stage.source
                and stage.source.removeprefix("stage:") not in seen + [stage.name]
                and not Path(stage.source).expanduser().exists()
                and "/" not in stage.source
            ):
                raise PipelineError(
                    f"{path}.source: {stage.source!r} is not an earlier stage nor an existing "
                    f"adapter{did_you_mean(stage.source, seen)}"
                )
            for name, values in (("k", stage.k), ("seeds", stage.seeds)):
                if not values:
                    raise PipelineError(f"{path}.{name}: give a non-empty list of integers")
            if stage.tasks:
                raise PipelineError(f"{path}.tasks: a transfer stage trains on its targets; use targets")
            if stage.sweep is not None:
                raise PipelineError(
                    f"{path}.sweep: a transfer stage is not swept; sweep its source stage (its best trial is the source)"
                )
        if stage.save_model and (stage.method or spec.method) != "finetune":
            raise PipelineError(f"{path}.save_model: only a finetune stage changes the backbone; remove save_model")
        seen.append(stage.name)
    return _resolve_inputs(spec, base)


# ----------------------------------------------------------------------------------------------- the plan


def _stage_model(spec: RecipeSpec, stage: StageSpec) -> str:
    model = stage.model or spec.model
    if model.startswith("stage:"):
        return str(Path(spec.output_dir) / model[len("stage:") :] / "model")
    return model


def _model_stage(spec: RecipeSpec, stage: StageSpec) -> str | None:
    model = stage.model or spec.model
    return model[len("stage:") :] if model.startswith("stage:") else None


def _job_config(
    spec: RecipeSpec,
    stage: StageSpec,
    output_dir: Path,
    data: dict,
    seed: int | None,
    init_adapter: str | None,
    path: str,
) -> JobConfig:
    train = {**spec.train, **stage.train}
    if seed is not None:
        train["seed"] = seed
    method = stage.method or spec.method
    unread = unread_fields(method)  # a recipe's r (or budget) is for its DePT stages; a pt stage that sets r is refused
    inherited = {k: v for k, v in spec.dept.items() if ("dept", k) not in unread}
    own = dict(stage.dept)
    if method == "lora":  # a paper recipe run with --method=lora keeps each task's s; its m and r are DePT's budget,
        # spent by lora.budget_tokens instead
        own = {k: v for k, v in own.items() if ("dept", k) not in unread}
    raw = {
        "model": _stage_model(spec, stage),
        "output_dir": str(output_dir),
        "ds_config": spec.ds_config,
        "method": method,
        "init_adapter": init_adapter,
        "save_model": stage.save_model,
        "on_length_mismatch": stage.on_length_mismatch or spec.on_length_mismatch,
        "model_overrides": spec.model_overrides,
        "dept": {**inherited, **own},
        "lora": {**spec.lora, **stage.lora},
        "train": train,
        "data": {**spec.data, **stage.data, **data},
    }
    return capped(build(JobConfig, raw, path))


def _adapter_of(spec: RecipeSpec, ref: str | None) -> tuple[str | None, str | None]:
    """(adapter path, stage it comes from) for `stage:<name>`, a bare stage name, or a path: the stage's best
    adapter on validation, or its last one when the stage does not evaluate."""
    if ref is None:
        return None, None
    name = ref.removeprefix("stage:")
    stage = next((s for s in spec.stages if s.name == name), None)
    if stage is None:
        return ref, None
    evaluates = {**spec.data, **stage.data}.get("evaluate", True)
    return str(Path(spec.output_dir) / name / ("best_adapter" if evaluates else "adapter")), name


def task_label(task) -> str:
    if isinstance(task, dict):
        return str(task.get("name"))
    return Path(task).stem if task.endswith((".yaml", ".yml", ".json")) else str(task)


def plan(recipe: Recipe, persist: bool = True) -> list[Job]:
    """Every job of the recipe, in execution order. A swept stage's trials are drawn from (and, for a sampled sweep,
    recorded in) its Optuna study; `persist=False` (a dry run) writes nothing."""
    spec, out = recipe.spec, recipe.output_dir
    jobs: list[Job] = []
    for i, stage in enumerate(spec.stages):
        path = f"recipe.stages[{i}] ({stage.name})"
        if stage.type == "train" and stage.sweep is not None:
            jobs += _trials(recipe, stage, path, persist)
            continue
        if stage.type == "train":
            adapter, from_stage = _adapter_of(spec, stage.init_adapter)
            cfg = _job_config(spec, stage, out / stage.name, {"tasks": list(stage.tasks)}, None, adapter, path)
            jobs.append(
                Job(
                    stage.name,
                    stage.name,
                    cfg,
                    {"type": "train", "tasks": [task_label(t) for t in stage.tasks]},
                    from_stage,
                    _model_stage(spec, stage),
                )
            )
            continue
        adapter, from_stage = _adapter_of(spec, stage.source)
        starts = ([("source", adapter)] if stage.source else []) + ([("scratch", None)] if stage.control else [])
        for target in stage.targets:
            for k in stage.k:
                for seed in stage.seeds:
                    for start, init in starts:
                        key = f"{stage.name}/{task_label(target)}/k{k}/seed{seed}/{start}"
                        cfg = _job_config(spec, stage, out / key, {"tasks": [target], "k": k}, seed, init, path)
                        meta = {"type": "transfer", "target": task_label(target), "k": k, "seed": seed, "start": start}
                        jobs.append(
                            Job(stage.name, key, cfg, meta, from_stage if init else None, _model_stage(spec, stage))
                        )
    return jobs


def _trials(recipe: Recipe, stage: StageSpec, path: str, persist: bool) -> list[Job]:
    """A swept train stage's jobs: one per setting, `<stage>/<tasks>/<setting>` (a sampled trial: `trial<i>`)."""
    spec = recipe.spec
    method = stage.method or spec.method
    swept = sweep.parse(stage.sweep, method, f"{path}.sweep")
    stage_dir = recipe.output_dir / stage.name
    settings = sweep.trial_settings(swept, sweep.study_name(spec.name, stage.name), stage_dir, persist)
    adapter, from_stage = _adapter_of(spec, stage.init_adapter)
    tasks = [task_label(t) for t in stage.tasks]
    sections = {name: getattr(stage, name) for name in SECTIONS}
    jobs = []
    for index, setting in enumerate(settings):
        label = sweep.setting_label(setting) if swept.method == "grid" else f"trial{index}"
        key = f"{stage.name}/{'+'.join(tasks) or 'file'}/{label}"
        trial_stage = replace(stage, **sweep.stage_sections(sections, setting))
        cfg = _job_config(spec, trial_stage, recipe.output_dir / key, {"tasks": list(stage.tasks)}, None, adapter, path)
        meta = {"type": "train", "tasks": tasks, "trial": label, "sweep": setting}
        if swept.method != "grid":
            meta["index"] = index
        jobs.append(Job(stage.name, key, cfg, meta, from_stage, _model_stage(spec, stage)))
    return jobs


def check_feasible(recipe: Recipe, jobs: list[Job]) -> None:
    """Refuse now what a job would fail on later (`preflight.check_job`: DeepSpeed config, model path, shapes,
    data and k-shot sizes, batch over the ranks), naming the job. Source adapters made by earlier stages do not
    exist yet and are not checked. Reads task files (no torch, no model)."""
    from pipeline.preflight import check_job

    checked: set[str] = set()
    for job in jobs:
        data_key = json.dumps([to_dict(job.config.data), job.config.train.seed], sort_keys=True, default=str)
        try:  # a model or adapter an earlier stage makes does not exist yet
            check_job(
                job.config,
                data=data_key not in checked,
                model=job.model_from_stage is None,
                init_adapter=job.init_from_stage is None,
            )
        except PipelineError as err:
            raise PipelineError(f"{job.key}: {err}") from None
        checked.add(data_key)


def describe_plan(recipe: Recipe, jobs: list[Job]) -> str:

    world = distributed.world_size()
    spec = recipe.spec
    lines = [
        f"recipe {spec.name}: {len(jobs)} jobs in {len(spec.stages)} stages, world size {world}, "
        f"output {spec.output_dir}, DeepSpeed config {spec.ds_config}"
    ]
    for stage in spec.stages:
        mine = [j for j in jobs if j.stage == stage.name]
        first = mine[0].config
        what = (
            ", ".join(mine[0].meta.get("tasks", []))
            if stage.type == "train"
            else (
                f"targets {', '.join(dict.fromkeys(str(j.meta['target']) for j in mine))}; k {stage.k}; seeds {stage.seeds}"
                + ("; with from-scratch control" if stage.control else "")
            )
        )
        dept, train = first.dept, first.train
        rates = f"lr={train.lr}"
        if first.method == "dept":
            shape = f"m={_given(dept.num_virtual_tokens)} r={_given(dept.r)} s={_given(dept.max_length)}"
            rates = f"lr_prompt={train.lr_prompt} lr_lowrank={train.lr_lowrank}"
        elif first.method == "lora":
            lora = first.lora
            budget = f" budget l={lora.budget_tokens}" if lora.budget_tokens else ""
            budget += f" budget {lora.budget_params:,} params" if lora.budget_params else ""
            shape = (
                f"LoRA r={lora.r or ('from budget' if budget else 'default')}{budget} "
                f"on {','.join(lora.target_modules) if lora.target_modules else 'default targets'} "
                f"s={dept.max_length or 'default'}"
            )
            rates = f"lr_lora={train.lr_lora}"
        elif first.method == "pt":
            shape = f"l={_given(dept.num_virtual_tokens)} s={_given(dept.max_length)}"
            rates = f"lr_prompt={train.lr_prompt}"
        else:
            shape = "all weights"
        lines.append(
            f"  {stage.name} ({stage.type}, {first.method}, model {first.model}): {len(mine)} job(s); {what}; "
            f"{shape}; steps={train.steps} batch={train.batch_size} {rates}"
        )
        if stage.sweep is not None:
            lines += _describe_sweep(stage, mine)
    return "\n".join(lines)


def _describe_sweep(stage: StageSpec, trials: list[Job]) -> list[str]:
    """A swept stage's trials as the plan shows them (the rates above are its first trial's)."""
    swept = sweep.parse(stage.sweep, trials[0].config.method, stage.name)
    how = {"grid": "grid", "tpe": "Optuna TPE", "random": "random sampling"}[swept.method]
    prune = "" if swept.prune == "none" else f", pruned by {swept.prune}"
    lines = [
        f"    sweep ({how}{prune}) over {', '.join(swept.keys)}: {len(trials)} trial(s), the best on validation "
        f"is the stage's result (<output_dir>/{stage.name}/best.json)"
    ]
    for job in trials:
        values = ", ".join(f"{k}={sweep.value_text(v)}" for k, v in job.meta["sweep"].items())
        lines.append(
            f"      {job.meta['trial']}: {values}" if job.meta["trial"].startswith("trial") else f"      {values}"
        )
    return lines


def _given(value: int | None) -> str:
    """A shape value as the plan shows it: the number (0 included), or 'default' when the job takes the default
    (or the init adapter's)."""
    return "default" if value is None else str(value)


def train_as_recipe(cfg: JobConfig, block: dict | str) -> dict:
    """`dept train ... --sweep BLOCK` as a one-stage recipe (`output_dir` the job's; trials under
    `<output_dir>/train/<task>/<setting>`): the job's settings as the recipe's sections, input paths absolute (the
    recipe file is written into output_dir), no MLflow (as `dept train`)."""
    config = to_dict(cfg)
    data = config["data"]
    if data.pop("k") is not None:
        raise PipelineError(
            "--sweep with --k: k-shot runs are a recipe's transfer stage; write a recipe (README: Sweeps)"
        )
    tasks = data.pop("tasks")

    def absolute(value):
        return str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value

    for key in ("data_dir", "train_file"):
        data[key] = absolute(data[key])
    sections = {name: {k: v for k, v in config[name].items() if v is not None} for name in SECTIONS}
    stage = {
        "name": "train",
        "tasks": [t if isinstance(t, dict) else absolute(t) for t in tasks],
        "sweep": sweep.named(block, "--sweep"),
    }
    if cfg.init_adapter:
        stage["init_adapter"] = absolute(cfg.init_adapter)
    return {
        "name": "train",
        "model": absolute(cfg.model),
        "output_dir": str(Path(cfg.output_dir).resolve()),
        "ds_config": absolute(cfg.ds_config),
        "method": cfg.method,
        "on_length_mismatch": cfg.on_length_mismatch,
        "model_overrides": cfg.model_overrides,
        **sections,
        "tracking": {"enabled": False},
        "stages": [stage],
    }


def resolved_dict(recipe: Recipe) -> dict:
    return to_dict(recipe.spec)
