"""One training job on its data: tasks (splits, k-shot or mixture) -> train -> best validation -> test ->
results.json.

`dept train` runs one job; a recipe runs one job per train stage and one per (target, k, seed) of a transfer
stage. A job trains on one task, a mixture of source tasks (examples-proportional, capped) or a plain
source/target file, evaluates every `eval_every` steps, keeps the best adapter, and reports the test metrics of the
best step. `results.json` is the job's completion marker and is written here, once, by rank 0, followed by the
job's `curves.png` (loss, learning rates, validation score).

Training rows stay memory-mapped `datasets.Dataset`s from reading to the training loop (`pipeline.tasks.tables`):
each node's LOCAL_RANK 0 renders (and mixes) the data into content-keyed cache files first while the other ranks
wait, then they open the same files (`data.local_rank_first`). Validation and test rows come from the same tables
as small lists (capped by `max_eval_rows`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pipeline import atomic, distributed, engine, logs
from pipeline.config import DataArgs, JobConfig
from pipeline.data import local_rank_first, source_target_table
from pipeline.errors import PipelineError
from pipeline.evaluation import Evaluator, MixtureEvaluator
from pipeline.fingerprint import job_fingerprint
from pipeline.options import to_dict
from pipeline.tasks import Task, kshot_sample, local_task_folder, mixture
from pipeline.tasks.loading import load_task_tables
from pipeline.tasks.specs import task_from_spec
from pipeline.tasks.tables import head
from pipeline.train import train

log = logging.getLogger(__name__)
RESULTS = "results.json"
JOB_LOG = "job.log"  # every message of the job, library messages the console leaves out included


@dataclass
class JobData:
    """The rows of one job: `train` rendered {id, source, target} (a memory-mapped `datasets.Dataset`);
    `held_out[task] = (validation, test)` as lists of row dicts."""

    tasks: list[Task]
    train: object  # datasets.Dataset
    held_out: dict[str, tuple[list[dict], list[dict]]]
    sizes: dict[str, dict]


def data_revisions(tasks: list[Task], data_dir: str | None) -> dict[str, str]:
    """Which version of each hub task's rows a job read: the hub revision ("main": unpinned), or "local <folder>"
    when the rows came from a local data folder (DEPT_DATA_DIR / data_dir), which takes precedence over the hub."""
    revisions = {}
    for task in tasks:
        if task.hub_path:
            folder = local_task_folder(task, data_dir)
            revisions[task.name] = f"local {folder}" if folder is not None else str(task.revision)
    return revisions


def resolve_tasks(data: DataArgs) -> list[Task]:
    """Registered task names, custom task mappings, or custom task YAML files, as Tasks."""
    return [task_from_spec(spec) for spec in data.tasks]


def load_job_data(data: DataArgs, seed: int) -> JobData:
    """Rows for a job: each task's splits by the paper's rules, k-shot sampled or mixed, capped for quick runs.

    Collective when a process group is up: each node's LOCAL_RANK 0 prepares the cache files first."""
    return local_rank_first(lambda: _load_job_data(data, seed))


def _load_job_data(data: DataArgs, seed: int) -> JobData:
    if data.train_file:
        rows = source_target_table(data.train_file)
        return JobData([], rows, {}, {"file": {"train": len(rows)}})
    tasks = resolve_tasks(data)
    per_task, held_out, sizes = {}, {}, {}
    for task in tasks:
        wanted = ("train", "validation", "test") if data.evaluate else ("train",)
        splits = load_task_tables(task, data.data_dir, splits=wanted)
        train_rows = splits["train"]
        if data.max_train_rows:
            train_rows = head(train_rows, data.max_train_rows)
        if data.k is not None:
            train_rows = kshot_sample(train_rows, data.k, seed, task)
        validation, test = (_small(splits.get(name), data.max_eval_rows) for name in ("validation", "test"))
        if not len(train_rows):
            raise PipelineError(f"task {task.name!r} has no training rows after filtering")
        per_task[task.name] = train_rows
        if data.evaluate:
            held_out[task.name] = (validation, test)
        sizes[task.name] = {"train": len(train_rows), "validation": len(validation), "test": len(test)}
    rows = per_task[tasks[0].name] if len(tasks) == 1 else mixture(per_task, data.mixture_cap, seed)
    if distributed.rank() == 0:
        log.info("data: %s (training rows: %d)", sizes, len(rows))
    return JobData(tasks, rows, held_out, sizes)


def _small(table, cap: int | None) -> list[dict]:
    """Evaluation rows as a list of dicts (the first `cap` of them when capped)."""
    if table is None:
        return []
    return (head(table, cap) if cap else table).to_list()


def make_evaluator(job_data: JobData, data: DataArgs, tokenizer, is_encoder_decoder: bool, max_length: int):
    """An Evaluator per task (a MixtureEvaluator over several); generation for tasks without a label set."""
    evaluators = {
        task.name: Evaluator(
            task,
            *job_data.held_out[task.name],
            tokenizer,
            is_encoder_decoder,
            max_length,
            mode=data.eval_mode if task.labels else "generate",
            batch_size=data.eval_batch_size,
            max_new_tokens=data.max_new_tokens,
        )
        for task in job_data.tasks
    }
    return next(iter(evaluators.values())) if len(evaluators) == 1 else MixtureEvaluator(evaluators)


def run_job(cfg: JobConfig, callbacks=(), on_data=None, title: str | None = None, should_stop=None) -> dict:
    """Train `cfg` on its data and write `<output_dir>/results.json` and `curves.png` (rank 0); returns the results.

    `on_data(name, context, rows)` is told which rows train and evaluate (the tracker logs them as datasets);
    `title` heads curves.png (default: the output directory's name). Everything logged meanwhile, library messages
    the console leaves out included, is appended to `<output_dir>/job.log` by rank 0 (the only rank that writes the output folder).
    `should_stop`: `train.train`'s early stop (a sweep trial's pruner).
    """
    with logs.to_file(Path(cfg.output_dir) / JOB_LOG):
        return _run_job(cfg, callbacks, on_data, title, should_stop)


def _run_job(cfg: JobConfig, callbacks, on_data, title: str | None, should_stop=None) -> dict:
    engine.init_distributed(cfg.train.comm_timeout_s)  # the ranks prepare the data together (once per node)
    job_data = load_job_data(cfg.data, cfg.train.seed)
    if on_data:
        on_data("+".join(t.name for t in job_data.tasks) or "file", "training", job_data.train)
        for name, (validation, test) in job_data.held_out.items():
            on_data(name, "validation", validation)
            on_data(name, "test", test)

    def evaluator_for(backbone, max_length: int):
        return make_evaluator(job_data, cfg.data, backbone.tokenizer, backbone.is_encoder_decoder, max_length)

    digest, record = job_fingerprint(cfg)
    result = train(
        cfg,
        job_data.train,
        evaluator_for if cfg.data.evaluate and job_data.tasks else None,
        callbacks,
        start_record={"fingerprint": digest, "record": record},
        separator=separator_of(job_data.tasks),
        should_stop=should_stop,
    )
    results = {
        "config": to_dict(cfg),
        "fingerprint": digest,
        **result.to_dict(),
        "tasks": [t.name for t in job_data.tasks],
        "data_sizes": job_data.sizes,
        "data_revisions": data_revisions(job_data.tasks, cfg.data.data_dir),
        "k": cfg.data.k,
        "eval_mode": cfg.data.eval_mode,
        **reported_score(job_data.tasks, result.test),
    }
    out = Path(cfg.output_dir)
    if distributed.rank() == 0:
        atomic.write_json(out / RESULTS, results)
        draw_curves(results, title or out.resolve().name, out)
    distributed.barrier()
    return results


def draw_curves(results: dict, title: str, out: Path) -> Path | None:
    """`<out>/curves.png` from a job's results (`plots.plot_job`); without matplotlib, a warning and no picture."""
    from pipeline.plots import draw, plot_job

    return draw(plot_job, results, title, Path(out) / "curves.png")


def separator_of(tasks: list[Task]) -> str | None:
    """The decoder-only separator the job's tasks share (None: the authors' default)."""
    separators = {t.separator for t in tasks}
    if len(separators) > 1:
        raise PipelineError(
            f"the tasks of a mixture render the text between source and target differently "
            f"({', '.join(repr(s) for s in separators)}): mix tasks with one separator"
        )
    return next(iter(separators), None)


def reported_score(tasks: list[Task], test: dict) -> dict:
    """The score a summary reports: the task's first metric (the paper's), which may differ from the metric the
    best step was selected on (CB: selected on macro-F1, reported as accuracy); a mixture reports its mean."""
    if not test:
        return {"reported_metric": None, "test_score": None}
    if len(tasks) == 1:
        return {"reported_metric": tasks[0].metrics[0], "test_score": test.get(tasks[0].metrics[0])}
    return {"reported_metric": "mean of the tasks' selection scores", "test_score": test.get("score")}
