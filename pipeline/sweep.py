"""Sweeps: a train stage run once per setting of some config keys, the best trial on validation kept as the stage's
result (and handed to the transfer stages that start from it). Issue #19.

    - name: source
      tasks: [rte]
      sweep: {train.lr_prompt: [0.3, 0.4], train.lr_lowrank: [1e-4, 5e-4, 1e-3, 5e-3]}        # grid: 8 trials

    sweep: {paired: {train.lr_prompt: [0.3, 0.4], train.lr_lowrank: [1e-4, 5e-4]}}            # varied together: 2
    sweep: {paired: {...}, train.seed: [1, 2]}                                             # pairs x seeds: 4
    sweep: {method: tpe, trials: 12, seed: 0,                                              # Optuna's TPE: 12
            space: {train.lr_prompt: {low: 0.01, high: 1.0, log: true}, train.warmup_steps: [0, 30]}}
    options: prune: median | successive_halving (stop trials whose validation curve lags: Optuna's pruners);
             storage: an Optuna storage URL (default: the journal file <output_dir>/<stage>/sweep.journal)

Keys are the recipe's dotted names (`train.lr_prompt`, `dept.r`: the names of `--overrides`), only keys the stage's
method reads and that change a job's result. Each trial is an ordinary `recipe.Job` (key
`<stage>/<tasks>/<setting>`, its own folder and fingerprint): a re-run reuses finished trials and resumes an
interrupted one, and a worker runs it without knowing about sweeps. The search lives in an Optuna study: every trial
is recorded there (its params, its validation score per evaluation, COMPLETE or PRUNED with its best validation
score), so Optuna's tools (optuna-dashboard, `optuna.load_study`) read a sweep as any other study. A sampled
(TPE) trial's parameters are drawn when the recipe is planned and persisted in the study; a re-plan reads them back
(the same trials), and raising `trials` draws the new ones from what the finished ones scored.

The stage's result: the trial with the best validation score (the task's selection metric; pruned trials never
win; ties go to the earlier trial), written to `<output_dir>/<stage>/best.json`, its best adapter copied to
`<output_dir>/<stage>/best_adapter` (where transfer stages look for a stage's adapter).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from pipeline import atomic
from pipeline.config import METHOD_FIELDS, SECTIONS, unread_fields
from pipeline.errors import PipelineError, did_you_mean

log = logging.getLogger(__name__)

SAMPLERS = ("grid", "tpe", "random")
PRUNERS = ("none", "median", "successive_halving")
OPTIONS = ("method", "trials", "space", "seed", "prune", "storage", "paired")
STORAGE_ENV = "DEPT_SWEEP_STORAGE"  # an Optuna storage URL for every sweep (many machines: a shared database)
BEST = "best.json"
JOURNAL = "sweep.journal"
# Named sweeps a recipe (or `dept run --sweep NAME`) gives every train stage. paper: the DePT authors' released runs
# searched lr_prompt {3e-1, 4e-1} x lr_lowrank {1e-4, 5e-4, 1e-3, 5e-3} per task (DEPT.md; their README).
NAMED = {"paper": {"train.lr_prompt": [0.3, 0.4], "train.lr_lowrank": [1e-4, 5e-4, 1e-3, 5e-3]}}
NOT_SWEPT = {("data", "tasks"), ("data", "k"), ("data", "train_file"), ("data", "evaluate")}  # the stage's own


@dataclass
class Sweep:
    """A parsed `sweep:` block. `grid` keys are crossed, `paired` keys vary together (equal lengths) and are
    crossed with the grid; `space` keys are sampled (`{low, high, log}` or `{choices: [...]}`) `trials` times."""

    method: str = "grid"
    grid: dict[str, list] = field(default_factory=dict)
    paired: dict[str, list] = field(default_factory=dict)
    space: dict[str, dict] = field(default_factory=dict)
    trials: int | None = None
    seed: int = 0
    prune: str = "none"
    storage: str | None = None

    @property
    def keys(self) -> list[str]:
        return list(self.paired) + list(self.grid) + list(self.space)


# ----------------------------------------------------------------------------------------------- parsing


def _flatten(raw: dict, where: str) -> dict:
    """`{train: {lr_prompt: [...]}}` (what `--stages.x.sweep.train.lr_prompt=...` builds) as `{train.lr_prompt: ...}`."""

    out = {}
    for key, value in raw.items():
        if key in SECTIONS and isinstance(value, dict):
            out.update({f"{key}.{leaf}": v for leaf, v in value.items()})
        else:
            out[str(key)] = value
    return out


def check_key(dotted: str, method: str, where: str):
    """The (section dataclass, field name) of a swept key, or a one-line error naming the fix."""
    from pipeline.fingerprint import NOT_RESULT_DEFINING

    parts = dotted.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise PipelineError(
            f"{where}: {dotted!r} is not a config key; sweep dotted keys as --overrides name them "
            f"({', '.join(SECTIONS)}: e.g. train.lr_prompt), or the options {', '.join(OPTIONS)}"
            f"{did_you_mean(dotted, list(OPTIONS))}"
        )
    section, name = parts
    cls = SECTIONS[section]
    if name not in cls.__dataclass_fields__:
        raise PipelineError(
            f"{where}: {dotted!r}: {section} has no key {name!r}{did_you_mean(name, cls.__dataclass_fields__)}"
        )
    path = (section, name)
    if path in NOT_SWEPT:
        raise PipelineError(f"{where}: {dotted!r} is the stage's own (tasks, k, evaluation); give one stage per value")
    if path in NOT_RESULT_DEFINING:
        raise PipelineError(f"{where}: {dotted!r} does not change a job's result; sweep a training key instead")
    if path in unread_fields(method) or (section,) in unread_fields(method):
        readers = [m for m, fields in METHOD_FIELDS.items() if path in fields or (section,) in fields]
        raise PipelineError(
            f"{where}: {dotted!r} is not a training key of a {method} stage (read by {', '.join(readers)}); "
            "remove it from the sweep"
        )
    return cls, name


def _value(cls, name: str, value, where: str):
    from pipeline.options import check_partial

    return check_partial(cls, {name: value}, where)[name]


def _values(dotted: str, values, method: str, where: str) -> list:
    cls, name = check_key(dotted, method, where)
    if not isinstance(values, list) or not values:
        raise PipelineError(f"{where}.{dotted}: give a non-empty list of values, e.g. {dotted}: [0.3, 0.4]")
    section = f"{where}.{dotted.split('.')[0]}"  # errors read "<where>.train.lr_prompt: expected a number, got ..."
    checked = [_value(cls, name, v, section) for v in values]
    if len({json.dumps(v, sort_keys=True, default=str) for v in checked}) < len(checked):
        raise PipelineError(f"{where}.{dotted}: a value is listed twice; list each value once")
    return checked


def _range(dotted: str, spec, method: str, where: str) -> dict:
    """A sampled key's range: `{low, high, log}` (int or float as the key is) or `{choices: [...]}` or a list."""
    cls, name = check_key(dotted, method, where)
    here = f"{where}.space.{dotted}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise PipelineError(f"{here}: give {{low: ..., high: ..., log: true}} or a list of choices")
    unknown = set(spec) - {"low", "high", "log", "choices"}
    if unknown:
        key = sorted(unknown)[0]
        raise PipelineError(f"{here}.{key}: unknown; use low, high, log or choices{did_you_mean(key, ['low', 'high'])}")
    if "choices" in spec:
        return {"choices": _values(dotted, spec["choices"], method, where)}
    if "low" not in spec or "high" not in spec:
        raise PipelineError(f"{here}: give low and high (and log: true for learning rates)")
    low, high = (_value(cls, name, spec[b], f"{here}.{b}") for b in ("low", "high"))  # "...low.lr_prompt: ..."
    if not isinstance(low, (int, float)) or isinstance(low, bool):
        raise PipelineError(f"{here}: {dotted} is not a number; list its choices instead")
    if not low < high:
        raise PipelineError(f"{here}: low {low} must be below high {high}")
    log_scale = bool(spec.get("log", False))
    if log_scale and low <= 0:
        raise PipelineError(f"{here}: a log range needs low > 0 (got {low})")
    return {"low": low, "high": high, "log": log_scale, "int": isinstance(low, int) and isinstance(high, int)}


def parse(raw, method: str, where: str) -> Sweep:
    """A stage's `sweep:` block checked (keys, values, options), or a one-line `PipelineError` naming the fix."""
    if not isinstance(raw, dict) or not raw:
        raise PipelineError(f"{where}: give a mapping of keys to values, e.g. sweep: {{train.lr_prompt: [0.3, 0.4]}}")
    raw = _flatten(raw, where)
    sweep = Sweep()
    chosen = str(raw.get("method", "grid")).lower()
    if chosen not in SAMPLERS:
        raise PipelineError(
            f"{where}.method: {chosen!r} is not one of {', '.join(SAMPLERS)}{did_you_mean(chosen, SAMPLERS)}"
        )
    sweep.method = chosen
    prune = str(raw.get("prune", "none")).lower()
    if prune not in PRUNERS:
        raise PipelineError(
            f"{where}.prune: {prune!r} is not one of {', '.join(PRUNERS)}{did_you_mean(prune, PRUNERS)}"
        )
    sweep.prune = prune
    sweep.storage = raw.get("storage")
    if "seed" in raw:
        seed = raw["seed"]
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise PipelineError(f"{where}.seed: give a non-negative integer")
        sweep.seed = seed
    if chosen == "grid":
        for option in ("trials", "space"):
            if option in raw:
                raise PipelineError(f"{where}.{option}: only a sampled sweep has {option}; add method: tpe (or random)")
        paired = raw.get("paired") or {}
        if not isinstance(paired, dict):
            raise PipelineError(f"{where}.paired: give a mapping of keys to equally long lists")
        sweep.paired = {k: _values(k, v, method, f"{where}.paired") for k, v in _flatten(paired, where).items()}
        if len({len(v) for v in sweep.paired.values()}) > 1:
            lengths = ", ".join(f"{k}: {len(v)}" for k, v in sweep.paired.items())
            raise PipelineError(f"{where}.paired: the lists must be equally long (got {lengths}); pair value by value")
        sweep.grid = {k: _values(k, v, method, where) for k, v in raw.items() if k not in OPTIONS}
    else:
        extra = [k for k in raw if k not in OPTIONS]
        if extra or "paired" in raw:
            bad = extra[0] if extra else "paired"
            raise PipelineError(f"{where}.{bad}: a sampled sweep takes its keys from space: {{{bad}: {{low, high}}}}")
        trials = raw.get("trials")
        if not isinstance(trials, int) or isinstance(trials, bool) or trials < 1:
            raise PipelineError(f"{where}.trials: a sampled sweep needs trials: N (a positive integer)")
        sweep.trials = trials
        space = raw.get("space")
        if not isinstance(space, dict) or not space:
            raise PipelineError(
                f"{where}.space: give the sampled keys, e.g. space: {{train.lr_prompt: {{low: 0.01, high: 1, log: true}}}}"
            )
        sweep.space = {k: _range(k, v, method, where) for k, v in _flatten(space, where).items()}
    if not sweep.keys:
        raise PipelineError(f"{where}: name at least one key to sweep, e.g. train.lr_prompt: [0.3, 0.4]")
    if len(sweep.keys) != len(set(sweep.keys)):
        raise PipelineError(f"{where}: a key is both paired and crossed; list it once")
    return sweep


def named(value, where: str) -> dict:
    """A recipe-level `sweep:` as a stage's block: a mapping as given, or a named sweep (`paper`)."""
    if isinstance(value, dict):
        return value
    if str(value) not in NAMED:
        raise PipelineError(
            f"{where}: {value!r} is not a named sweep ({', '.join(NAMED)}); or give a mapping such as "
            f"{{train.lr_prompt: [0.3, 0.4]}}{did_you_mean(str(value), list(NAMED))}"
        )
    return NAMED[str(value)]


# ----------------------------------------------------------------------------------------------- trials


def grid_settings(sweep: Sweep) -> list[dict]:
    """Every setting of a grid sweep, in a stable order: the pairs (in their order) crossed with the grid keys
    (the last key varies fastest)."""
    pairs = [dict(zip(sweep.paired, values)) for values in zip(*sweep.paired.values())] or [{}]
    crossed = [dict(zip(sweep.grid, values)) for values in itertools.product(*sweep.grid.values())] or [{}]
    return [{**p, **c} for p in pairs for c in crossed]


def value_text(value) -> str:
    if isinstance(value, float):
        return format(value, "g")
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"), default=str)
    return str(value)


def setting_label(setting: dict) -> str:
    """A trial's readable, stable name: `lr_prompt=0.3,lr_lowrank=0.0001` (the section is shown only where two keys
    share a field name)."""
    leaves = [k.split(".")[-1] for k in setting]
    return ",".join(
        f"{leaf if leaves.count(leaf) == 1 else key}={value_text(value)}"
        for key, leaf, value in zip(setting, leaves, setting.values())
    ).replace("/", "_")


def stage_sections(stage_sections: dict[str, dict], setting: dict) -> dict[str, dict]:
    """A stage's sections (`{"train": {...}, "dept": {...}, ...}`) with a trial's values set."""
    out = {name: dict(values) for name, values in stage_sections.items()}
    for dotted, value in setting.items():
        section, name = dotted.split(".")
        out.setdefault(section, {})[name] = value
    return out


# ----------------------------------------------------------------------------------------------- the study


def study_name(recipe_name: str, stage: str) -> str:
    return f"dept.{recipe_name}.{stage}"


def storage_of(sweep: Sweep, stage_dir: Path, persist: bool = True):
    """The study's storage: the recipe's `storage:` URL, else $DEPT_SWEEP_STORAGE, else the journal file
    `<stage_dir>/sweep.journal` (one machine, or many on a shared filesystem); in memory when not persisting
    (`--dry_run` writes nothing)."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    url = sweep.storage or os.environ.get(STORAGE_ENV)
    if not persist:
        return optuna.storages.InMemoryStorage()
    if url:
        return url
    stage_dir.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(stage_dir / JOURNAL)))


def _sampler(sweep: Sweep):
    import optuna

    if sweep.method == "tpe":
        return optuna.samplers.TPESampler(seed=sweep.seed)
    return optuna.samplers.RandomSampler(seed=sweep.seed)


def _pruner(sweep: Sweep):
    """Optuna's pruners; a trial is compared with the others once two have finished (`n_startup_trials`), from its
    first validation on."""
    import optuna

    if sweep.prune == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)
    if sweep.prune == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(sweep: Sweep, name: str, stage_dir: Path, persist: bool = True):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the console says what each trial does (runner.Progress)
    storage = storage_of(sweep, stage_dir, persist)
    return optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize",
        sampler=_sampler(sweep),
        pruner=_pruner(sweep),
        load_if_exists=True,
    )


def _distribution(spec: dict):
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if "choices" in spec:
        return CategoricalDistribution([_choice(c) for c in spec["choices"]])
    if spec["int"]:
        return IntDistribution(spec["low"], spec["high"], log=spec["log"])
    return FloatDistribution(spec["low"], spec["high"], log=spec["log"])


def _choice(value):
    """Optuna's categorical choices are None, bool, int, float or str: others as JSON text."""
    return value if value is None or isinstance(value, (bool, int, float, str)) else json.dumps(value)


def sampled_settings(sweep: Sweep, name: str, stage_dir: Path, persist: bool = True) -> list[dict]:
    """The `trials` settings of a sampled sweep: trial i's parameters as the study first recorded them (attr
    `dept.index`), the missing ones asked from the sampler now and recorded (unless `persist` is false: a dry run
    asks a copy in memory). Several planners racing each keep the earliest-numbered trial of an index: the same
    trials."""
    import optuna

    study = open_study(sweep, name, stage_dir, persist)
    if not persist and (sweep.storage or os.environ.get(STORAGE_ENV) or (stage_dir / JOURNAL).exists()):
        try:
            study.add_trials(optuna.load_study(study_name=name, storage=storage_of(sweep, stage_dir)).trials)
        except KeyError:  # no such study yet
            pass
    known = _by_index(study)
    for index in range(sweep.trials or 0):
        if index in known:
            continue
        trial = study.ask()
        for key, spec in sweep.space.items():
            trial._suggest(key, _distribution(spec))  # noqa: SLF001 -- suggest_float/int/categorical by the spec
        trial.set_user_attr("dept.index", index)
    known = _by_index(study)
    for trial in study.get_trials(deepcopy=False):  # another planner's draw of an index already drawn: never run
        index = trial.user_attrs.get("dept.index")
        if index is not None and known[index].number != trial.number and not trial.state.is_finished():
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    return [dict(known[i].params) for i in range(sweep.trials or 0)]


def _by_index(study) -> dict[int, object]:
    found: dict[int, object] = {}
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        index = trial.user_attrs.get("dept.index")
        if index is not None and index not in found:
            found[index] = trial
    return found


def trial_settings(sweep: Sweep, name: str, stage_dir: Path, persist: bool = True) -> list[dict]:
    if sweep.method == "grid":
        return grid_settings(sweep)
    return sampled_settings(sweep, name, stage_dir, persist)


def distributions(sweep: Sweep) -> dict:
    """Each swept key's Optuna distribution (a grid key: its values as choices)."""
    out = {k: _distribution({"choices": v}) for k, v in {**sweep.paired, **sweep.grid}.items()}
    return {**out, **{k: _distribution(spec) for k, spec in sweep.space.items()}}


class TrialRecord:
    """A running trial's Optuna record: `report(step, score)` after each validation, `should_prune()`, `finish()`.
    Found by the job's key and fingerprint (an interrupted trial resumes its record; a trial re-run with other
    settings gets a new one); a sampled trial's first record is the one its parameters were drawn in."""

    def __init__(self, study, sweep: Sweep, job, digest: str):
        import optuna

        self.study = study
        trials = study.get_trials(deepcopy=False)
        drawn = _by_index(study).get(job.meta.get("index"))
        mine = [t for t in trials if t.user_attrs.get("dept.job") == job.key or (drawn and t.number == drawn.number)]
        open_ = [
            t for t in mine if not t.state.is_finished() and t.user_attrs.get("dept.fingerprint") in (digest, None)
        ]
        if open_:
            frozen = open_[0]
        else:
            params = job.meta["sweep"]
            study.add_trial(
                optuna.trial.create_trial(
                    state=optuna.trial.TrialState.RUNNING,
                    params={k: _choice(v) for k, v in params.items()},
                    distributions={k: distributions(sweep)[k] for k in params},
                    user_attrs={"dept.job": job.key},
                )
            )
            frozen = max(
                (t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("dept.job") == job.key),
                key=lambda t: t.number,
            )
        self.trial = optuna.trial.Trial(study, frozen._trial_id)  # noqa: SLF001 -- a trial of this study
        self.trial.set_user_attr("dept.job", job.key)
        self.trial.set_user_attr("dept.fingerprint", digest)
        self.trial.set_user_attr("dept.output_dir", str(Path(job.config.output_dir).resolve()))

    @property
    def number(self) -> int:
        return self.trial.number

    def report(self, step: int, score: float) -> None:
        import warnings

        with warnings.catch_warnings():  # a resumed trial re-validates no step it reported; Optuna ignores repeats
            warnings.simplefilter("ignore")
            self.trial.report(score, step)

    def should_prune(self) -> bool:
        return self.trial.should_prune()

    def finish(self, result: dict) -> None:
        import optuna

        score = result.get("best_validation")
        if pruned(result):
            self.study.tell(self.trial, state=optuna.trial.TrialState.PRUNED, skip_if_finished=True)
        elif isinstance(score, (int, float)):
            self.study.tell(self.trial, float(score), skip_if_finished=True)
        else:
            self.study.tell(self.trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)


def record_finished(study, sweep: Sweep, job, result: dict) -> None:
    """A trial reused from its results.json that the study does not hold finished (its journal was removed, or
    the run stopped between results.json and the study): recorded now."""
    digest = result.get("fingerprint")
    done = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.user_attrs.get("dept.job") == job.key
        and t.user_attrs.get("dept.fingerprint") == digest
        and t.state.is_finished()
    ]
    if not done:
        TrialRecord(study, sweep, job, digest).finish(result)


# ----------------------------------------------------------------------------------------------- the winner


def is_trial(job) -> bool:
    return "trial" in job.meta


def pruned(result: dict) -> bool:
    return bool(result.get("stopped_early"))


def best_trial(trials: list, results: dict[str, dict]):
    """The trial job with the highest best validation score (`results[key]["best_validation"]`: the task's
    selection metric); pruned or unscored trials never win; ties go to the earlier trial. None: no candidate."""
    best, best_score = None, None
    for job in trials:
        result = results.get(job.key) or {}
        score = result.get("best_validation")
        if pruned(result) or not isinstance(score, (int, float)):
            continue
        if best_score is None or score > best_score:
            best, best_score = job, score
    return best


def trial_rows(trials: list, results: dict[str, dict]) -> list[dict]:
    """One row per trial: setting, swept values, best validation, at step, pruned, test score, winner."""
    winner = best_trial(trials, results)
    rows = []
    for job in trials:
        result = results.get(job.key) or {}
        stopped = result.get("stopped_early") or {}
        rows.append(
            {
                "key": job.key,
                "setting": job.meta["trial"],
                "values": job.meta["sweep"],
                "best_validation": _round(result.get("best_validation")),
                "best_step": result.get("best_step"),
                "pruned_at": stopped.get("step"),
                "test_score": _round(result.get("test_score")),
                "winner": job is winner,
            }
        )
    return rows


def _round(value):
    return round(value, 2) if isinstance(value, float) else value


def finish_stage(stage: str, trials: list, results: dict[str, dict], stage_dir: Path) -> dict | None:
    """After a swept stage's last trial (rank 0): `<stage_dir>/best.json` names the winner, and its best adapter
    is copied to `<stage_dir>/best_adapter`,
    where transfer stages that start from this stage look. Idempotent; returns best.json's content."""
    winner = best_trial(trials, results)
    if winner is None:
        raise PipelineError(
            f"stage {stage}: no trial of its sweep has a validation score (all pruned or failed); widen the sweep "
            "or turn pruning off"
        )
    result = results[winner.key]
    source = Path(winner.config.output_dir) / "best_adapter"
    if not source.is_dir():
        source = Path(winner.config.output_dir) / "adapter"
    best = {
        "stage": stage,
        "winner": winner.key,
        "setting": winner.meta["trial"],
        "values": winner.meta["sweep"],
        "output_dir": str(Path(winner.config.output_dir).resolve()),
        "best_validation": result.get("best_validation"),
        "best_step": result.get("best_step"),
        "test_score": result.get("test_score"),
        "reported_metric": result.get("reported_metric"),
        "fingerprint": result.get("fingerprint"),
        "trials": trial_rows(trials, results),
    }
    target = stage_dir / "best_adapter"
    if _weights_of(target) != _weights_of(source):
        with atomic.replace_dir(target) as tmp:
            for item in source.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
    atomic.write_json(stage_dir / BEST, best)
    return best


def _weights_of(adapter: Path) -> str | None:
    """A digest of an adapter folder's files (None: no such folder)."""
    if not adapter.is_dir():
        return None
    digest = hashlib.sha256()
    for item in sorted(p for p in adapter.iterdir() if p.is_file()):
        digest.update(item.name.encode() + item.read_bytes())
    return digest.hexdigest()


def read_best(stage_dir: Path) -> dict | None:
    try:
        return json.loads((Path(stage_dir) / BEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None


# ----------------------------------------------------------------------------------------------- the runner's side


@dataclass
class TrialHooks:
    """What a trial's job is run with: `should_stop` for `train.train` (reports each validation score to the
    trial's Optuna record; with a pruner, stops a trial the pruner gives up on); `record` on rank 0 only."""

    record: TrialRecord | None
    prune: bool

    def should_stop(self, step: int, score: float) -> str | None:
        from pipeline import distributed

        reason = None
        if self.record is not None:
            self.record.report(step, score)
            if self.prune and self.record.should_prune():
                reason = f"pruned by Optuna's {type(self.record.study.pruner).__name__} (validation {score:.1f})"
        return distributed.broadcast_object(reason) if self.prune else None


class Sweeps:
    """A recipe's sweeps as the runner drives them: `hooks(job, action)` before a trial runs, `finished(job,
    result, hooks)` after it (or after reusing it), `stage_done(stage, jobs, results)` after its stage's last trial.
    Every rank calls them; only rank 0 opens the studies and writes."""

    def __init__(self, recipe, rank: int):
        self.recipe, self.rank = recipe, rank
        self.sweeps = {
            stage.name: parse(stage.sweep, stage.method or recipe.spec.method, stage.name)
            for stage in recipe.spec.stages
            if stage.type == "train" and stage.sweep is not None
        }
        self._studies: dict[str, object] = {}

    def study(self, stage: str):
        if stage not in self._studies:
            self._studies[stage] = open_study(
                self.sweeps[stage], study_name(self.recipe.name, stage), self.recipe.output_dir / stage
            )
        return self._studies[stage]

    def last_trial(self, job, jobs: list) -> bool:
        """Whether `job` is its swept stage's last trial in the plan (its stage's winner can be picked after it)."""
        return is_trial(job) and [j for j in jobs if j.stage == job.stage][-1] is job

    def hooks(self, job, action: str) -> TrialHooks | None:
        if not is_trial(job) or action == "reuse":
            return None
        from pipeline.fingerprint import job_fingerprint

        sweep = self.sweeps[job.stage]
        record = None
        if self.rank == 0:
            digest, _ = job_fingerprint(job.config)
            record = TrialRecord(self.study(job.stage), sweep, job, digest)
        return TrialHooks(record, sweep.prune != "none")

    def finished(self, job, result: dict, hooks: TrialHooks | None) -> None:
        if not is_trial(job) or self.rank != 0:
            return
        if hooks is not None and hooks.record is not None:
            hooks.record.finish(result)
        else:
            record_finished(self.study(job.stage), self.sweeps[job.stage], job, result)

    def stage_done(self, stage: str, jobs: list, results: dict[str, dict]) -> dict | None:
        """The stage's winner (best.json, best_adapter) on rank 0; every rank waits for it."""
        from pipeline import distributed

        best = None
        if self.rank == 0:
            trials = [j for j in jobs if j.stage == stage]
            best = finish_stage(stage, trials, results, self.recipe.output_dir / stage)
        distributed.barrier()
        return best
