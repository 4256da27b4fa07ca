"""One training stage on real tasks: data (splits, k-shot or mixture) -> train -> best validation -> test.

Used by `dept train --task ...` and by every stage of a recipe. A stage trains on one task, or on a
mixture of source tasks (examples-proportional, capped), evaluates on the validation split(s) every
`eval_every` steps, keeps the best adapter, and reports the test metrics of the best step in results.json.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pipeline import distributed
from pipeline.errors import PipelineError
from pipeline.evaluate import Evaluation
from pipeline.tasks import custom_task, get_task, kshot_sample, load_task_splits, mixture

log = logging.getLogger(__name__)


@dataclass
class DataSpec:
    """Which rows a stage trains and evaluates on."""

    tasks: list = field(metadata={"help": "task names or custom task dicts; several = a source mixture"})
    data_dir: str | None = field(default=None, metadata={"help": "local <task>/<split>.jsonl root (else DEPT_DATA_DIR, else hub)"})
    k: int | None = field(default=None, metadata={"help": "k-shot: class-balanced k training rows drawn with the seed"})
    mixture_cap: int = field(default=100_000, metadata={"help": "at most this many rows per task in a mixture"})
    max_train_rows: int | None = field(default=None, metadata={"help": "cap training rows per task (quick runs)"})
    max_eval_rows: int | None = field(default=None, metadata={"help": "cap validation/test rows per task"})
    eval_mode: str = field(default="generate", metadata={"help": "generate | score (classification only)"})
    evaluate: bool = field(default=True, metadata={"help": "validate/test (False: train only, keep the last adapter)"})
    eval_batch_size: int = 32
    max_new_tokens: int = 20

    def __post_init__(self):
        if isinstance(self.tasks, (str, dict)):
            self.tasks = [self.tasks]
        if not self.tasks:
            raise PipelineError("a stage needs at least one task")
        if self.k is not None and len(self.tasks) > 1:
            raise PipelineError("k-shot sampling applies to one target task, not to a mixture: give one task")


def resolve_task(spec):
    from pipeline.synthetic import SYNTHETIC_TASKS, synthetic_task

    if isinstance(spec, dict):
        return custom_task(spec)
    return synthetic_task(spec) if spec in SYNTHETIC_TASKS else get_task(spec)


def task_splits(task, data_dir, splits=("train", "validation", "test")) -> dict[str, list[dict]]:
    """Rendered rows of `splits`: generated for synthetic tasks, else loaded by the split rules."""
    from pipeline.synthetic import SYNTHETIC_TASKS, synthetic_rows

    if task.name in SYNTHETIC_TASKS:
        return {split: synthetic_rows(task.name, split) for split in splits}
    return load_task_splits(task, data_dir, splits=splits)


def prepare(data: DataSpec, seed: int):
    """(tasks, training rows, {task name: (validation rows, test rows)}, sizes) for a stage."""
    tasks = [resolve_task(t) for t in data.tasks]
    per_task, held_out, sizes = {}, {}, {}
    for task in tasks:
        splits = task_splits(task, data.data_dir, ("train", "validation", "test") if data.evaluate else ("train",))
        train_rows = splits["train"]
        if data.max_train_rows:
            train_rows = train_rows[: data.max_train_rows]
        if data.k is not None:
            train_rows = kshot_sample(train_rows, data.k, seed, task.labels)
        validation, test = splits.get("validation", []), splits.get("test", [])
        if data.max_eval_rows:
            validation, test = validation[: data.max_eval_rows], test[: data.max_eval_rows]
        if not train_rows:
            raise PipelineError(f"task {task.name!r} has no training rows after filtering")
        per_task[task.name] = train_rows
        if data.evaluate:
            held_out[task.name] = (validation, test)
        sizes[task.name] = {"train": len(train_rows), "validation": len(validation), "test": len(test)}
    rows = per_task[tasks[0].name] if len(tasks) == 1 else mixture(per_task, data.mixture_cap, seed)
    if distributed.rank() == 0:
        log.info("data: %s (training rows: %d)", sizes, len(rows))
    return tasks, rows, held_out, sizes


class MixtureEvaluation:
    """Evaluation over several tasks: `score` is the mean of their main metrics; metrics are `task/metric`."""

    def __init__(self, evaluations: dict[str, Evaluation]):
        self.evaluations = evaluations

    def _combine(self, per_task: dict[str, dict]) -> dict:
        flat = {f"{name}/{k}": v for name, metrics in per_task.items() for k, v in metrics.items()}
        scores = [m["score"] for m in per_task.values() if "score" in m]
        return {**flat, "score": sum(scores) / len(scores)} if scores else flat

    def validate(self, module, step: int) -> dict:
        return self._combine({n: e.validate(module, step) for n, e in self.evaluations.items()})

    def test(self, module) -> dict:
        return self._combine({n: e.test(module) for n, e in self.evaluations.items()})


def evaluation_for(tasks, held_out, data: DataSpec, tokenizer, is_encoder_decoder: bool, max_length: int):
    evaluations = {
        task.name: Evaluation(task, held_out[task.name][0], held_out[task.name][1], tokenizer, is_encoder_decoder,
                              max_length, mode=data.eval_mode if task.labels else "generate",
                              batch_size=data.eval_batch_size, max_new_tokens=data.max_new_tokens)
        for task in tasks
    }
    if len(evaluations) == 1:
        return next(iter(evaluations.values()))
    return MixtureEvaluation(evaluations)


def run_stage(cfg, data: DataSpec, callbacks=(), on_data=None) -> dict:
    """Train `cfg` (a TrainConfig) on `data`; returns train()'s outcome (results also in results.json).

    `on_data(name, split, rows)` is told which rows train and evaluate (the tracker logs them as datasets).
    """
    from pipeline import atomic
    from pipeline.train import train

    tasks, rows, held_out, sizes = prepare(data, cfg.seed)
    if on_data:
        on_data("+".join(t.name for t in tasks), "training", rows)
        for name, (validation, test) in held_out.items():
            on_data(name, "validation", validation)
            on_data(name, "test", test)

    def make_evaluation(backbone):
        return evaluation_for(tasks, held_out, data, backbone.tokenizer, backbone.is_encoder_decoder, cfg.max_length)

    outcome = train(cfg, rows, make_evaluation if data.evaluate else None, callbacks)
    results = outcome["results"]
    results.update(tasks=[t.name for t in tasks], data_sizes=sizes, k=data.k, eval_mode=data.eval_mode)
    if distributed.rank() == 0:
        atomic.write_json(f"{cfg.output_dir}/results.json", results)
    return outcome
