"""`dept`: the command line, straight from typed function signatures (python-fire).

    dept train --model random:tiny-t5 --train_file data.jsonl --output_dir runs/x     # one process
    ./launch.sh train --model random:tiny-t5 --train_file data.jsonl --output_dir runs/x   # all local ranks
    dept COMMAND --help

Bad input ends with one line on stderr (`error: ...`) and exit status 2; `--debug` shows the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.interop import export_adapter, import_adapter  # light: interop imports torch lazily
from pipeline.bench import bench  # light: bench imports torch/deepspeed/peft/mlflow only when it runs

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DS_CONFIG = str(REPO / "ds_configs" / "zero3_cpu.json")
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")


def _refuse_finished_run(output_dir: str, overwrite: bool) -> None:
    """A finished run is never overwritten silently; an unfinished one resumes from its checkpoint."""
    results = Path(output_dir) / "results.json"
    if results.exists() and not overwrite:
        raise PipelineError(f"{output_dir} already holds a finished run (results.json): pass --overwrite to "
                            "replace it or choose another --output_dir")
    if results.exists() and overwrite and int(os.environ.get("RANK", "0")) == 0:
        import shutil

        shutil.rmtree(output_dir)


def train(
    model: str,
    output_dir: str,
    task: str = "",
    train_file: str = "",
    custom_task: dict | str | None = None,
    data_dir: str = "",
    k: int = 0,
    ds_config: str = DEFAULT_DS_CONFIG,
    method: str = "dept",
    num_virtual_tokens: int = 60,
    lora_rank: int = 30,
    budget_tokens: int = 0,
    max_length: int = 256,
    lr_prompt: float = 0.3,
    lr_lowrank: float = 1e-4,
    lr: float = 1e-4,
    batch_size: int = 32,
    grad_accum: int = 1,
    steps: int = 1000,
    warmup_steps: int = 500,
    seed: int = 42,
    eval_every: int = 0,
    eval_mode: str = "generate",
    max_eval_rows: int = 0,
    max_train_rows: int = 0,
    save_every: int = 0,
    log_every: int = 10,
    prompt_init: str = "TEXT",
    init_adapter: str = "",
    pad_to_max_length: bool = False,
    group_by_length: bool = False,
    model_overrides: dict | None = None,
    on_nonfinite: str = "stop",
    comm_timeout_s: float = 1800.0,
    overwrite: bool = False,
) -> None:
    """Train DePT (or `pt`, or `finetune`) on a task of the registry, a custom task, or a source/target JSONL file.

    Args:
        model: hub name, local model directory, or random:<preset> (random:tiny-t5, random:tiny-llama, ...).
        output_dir: run directory; an unfinished run there resumes from its last checkpoint.
        task: a registered task (rte, mnli, boolq, ...; comma-separated for a source mixture).
        train_file: instead of a task, a JSONL with source/target text columns (no evaluation).
        custom_task: instead of a task, a dict or YAML/JSON file: name, data_files, input_columns, label_column,
            label_words, template, metric.
        data_dir: local root of <task>/<split>.jsonl files (default: $DEPT_DATA_DIR, else the hub).
        k: k-shot: train on k class-balanced rows drawn with the seed (0 = all rows).
        ds_config: DeepSpeed JSON (ds_configs/zero3_cpu.json on CPU, zero3_gpu_bf16.json on GPUs).
        method: dept | pt | finetune.
        num_virtual_tokens: m, the prompt length; lora_rank: r, the rank of A @ B (the launchers take --r and --m
            as abbreviations of their own flags, hence the long names); max_length: s, the longest input in tokens.
        budget_tokens: l: choose r so that DePT spends the parameters of prompt tuning with l tokens
            (r = (l - m) d / (s + d)); overrides lora_rank.
        lr_prompt: learning rate of the prompt; lr_lowrank: of A and B; lr: of the backbone (finetune).
        batch_size: global batch over all ranks and accumulation steps.
        eval_every: validate every N steps (0: once at the end); the best adapter scores the test split.
        eval_mode: generate (greedy decoding) | score (rank the label strings by likelihood).
        on_nonfinite: stop (default) | skip a step whose loss is NaN/inf; a NaN adapter is never written.
        comm_timeout_s: a collective waiting longer than this fails (a rank died or hangs) instead of hanging.
        overwrite: replace a finished run in output_dir (otherwise refused).
    """
    from pipeline.data import read_source_target
    from pipeline.train import TrainConfig, train as run_training

    sources = [bool(task), bool(train_file), custom_task is not None]
    if sum(sources) != 1:
        raise PipelineError("train needs exactly one of --task, --custom_task or --train_file")
    _refuse_finished_run(output_dir, overwrite)
    cfg = TrainConfig(model=model, output_dir=output_dir, ds_config=ds_config, method=method,
                      num_virtual_tokens=num_virtual_tokens, r=lora_rank, budget_tokens=budget_tokens or None,
                      max_length=max_length,
                      lr_prompt=lr_prompt, lr_lowrank=lr_lowrank, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                      steps=steps, warmup_steps=warmup_steps, seed=seed, eval_every=eval_every, save_every=save_every,
                      log_every=log_every, prompt_init=prompt_init, init_adapter=init_adapter or None,
                      pad_to_max_length=pad_to_max_length, group_by_length=group_by_length,
                      model_overrides=model_overrides,
                      on_nonfinite=on_nonfinite, comm_timeout_s=comm_timeout_s)
    if train_file:
        result = run_training(cfg, read_source_target(train_file))["results"]
    else:
        from pipeline.stage import DataSpec, run_stage

        tasks = [_load_custom_task(custom_task)] if custom_task is not None else _task_list(task)
        data = DataSpec(tasks=tasks, data_dir=data_dir or None, k=k or None, eval_mode=eval_mode,
                        max_eval_rows=max_eval_rows or None, max_train_rows=max_train_rows or None)
        result = run_stage(cfg, data)["results"]
    if int(os.environ.get("RANK", "0")) == 0:
        summary = f"done: final loss {result['final_loss']:.4f}"
        if result.get("test"):
            summary += f"; best step {result['best_step']}, test {_main_metrics(result['test'])}"
        print(f"{summary}; results in {Path(output_dir) / 'results.json'}")


def _task_list(task) -> list[str]:
    return [t.strip() for t in (task.split(",") if isinstance(task, str) else task) if t.strip()]


def _load_custom_task(spec) -> dict:
    """A custom task given inline (dict) or as a YAML/JSON file path."""
    if isinstance(spec, dict):
        return spec
    path = Path(str(spec))
    if not path.is_file():
        raise PipelineError(f"custom_task {spec!r} is neither a dict nor an existing YAML/JSON file")
    import yaml

    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise PipelineError(f"custom_task file {path} must hold a mapping (name, data_files, input_columns, ...)")
    return loaded


def _main_metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.2f}" for k, v in metrics.items() if isinstance(v, float) and k != "score")


def evaluate(model: str, adapter: str, task: str, split: str = "test", ds_config: str = DEFAULT_DS_CONFIG,
             data_dir: str = "", batch_size: int = 32, mode: str = "generate", max_rows: int = 0) -> None:
    """Score an adapter on a task's split (made by the paper's split rules) and print the metrics as JSON.

    Args:
        model: the backbone the adapter was trained on (hub name, local dir or random:<preset>).
        adapter: adapter directory (ours, or an authors' DePT adapter).
        task: registered task name; split: train | validation | test.
        mode: generate (greedy decoding; invalid outputs counted) | score (rank label strings by likelihood).
    """
    import json

    from pipeline.predict import evaluate as run_evaluation

    metrics = run_evaluation(model, adapter, task, split, ds_config, data_dir or None, batch_size, mode,
                             max_rows or None)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics, indent=2))


def predict(model: str, adapter: str, data: str, output: str, task: str = "", ds_config: str = DEFAULT_DS_CONFIG,
            batch_size: int = 32, max_new_tokens: int = 20, mode: str = "generate") -> None:
    """Run an adapter over a JSONL/CSV/parquet file and write predictions JSONL ({id, prediction[, label]}).

    Args:
        data: rows with a `source` column (and optional `target`), or hub-schema rows of --task.
        output: predictions file, written atomically; metrics go beside it when labels exist.
        task: render hub-schema rows with this task's template and score with its metrics.
    """
    from pipeline.predict import predict as run_prediction

    metrics = run_prediction(model, adapter, data, output, ds_config, task or None, batch_size, max_new_tokens, mode)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"predictions in {output}" + (f"; {_main_metrics(metrics)}" if metrics else ""))


def run(recipe: str = "", dry_run: bool = False, **overrides) -> None:
    """Run every stage of a recipe (source pretraining -> few-shot transfer), tracked in MLflow.

    Args:
        recipe: YAML recipe (default: the shipped recipes/quickstart.yaml).
        dry_run: validate and print the plan (stages, runs, world size) without training.
        overrides: `--key=value` for any recipe key, nested with dots (--train.steps=10,
            --stages.transfer.k=[4,16], --tracking.uri=http://127.0.0.1:5000); they beat the file's values.
    """
    from pipeline.runner import run_recipe

    run_recipe(recipe or str(QUICKSTART), overrides, dry_run)


COMMANDS = {"run": run, "train": train, "evaluate": evaluate, "predict": predict,
            "import-adapter": import_adapter, "export-adapter": export_adapter, "bench": bench}


def main(argv: list[str] | None = None) -> int:
    import fire

    argv = list(sys.argv[1:] if argv is None else argv)
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment says the same.
    argv = [a for a in argv if not a.startswith("--local_rank")]
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    _setup_logging()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    who = f" (rank {os.environ.get('RANK', '0')})" if world > 1 else ""
    try:
        fire.Fire(COMMANDS, command=argv, name="dept")
    except PipelineError as err:
        if debug:
            raise
        print(f"error{who}: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a peer rank died or hangs: gloo/NCCL errors and collective timeouts
        text = str(err)
        if debug or world == 1 or not any(w in text.lower() for w in ("timeout", "timed out", "closed by peer",
                                                                        "connection reset", "nccl", "gloo")):
            raise
        print(f"error{who}: lost contact with another rank ({text.splitlines()[0][:160]}); the failed rank's own "
              "log names the cause; raise comm_timeout_s if steps are just slow", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
