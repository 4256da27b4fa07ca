"""Inference with a trained adapter: a ZeRO-3 inference engine (no optimizer), batched, on one rank or many.

    dept predict --model DIR --adapter RUN/best_adapter --data new.jsonl --output preds.jsonl [--task rte]
    dept evaluate --model DIR --adapter RUN/best_adapter --task rte --split test
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline import adapters, atomic, distributed
from pipeline.backbone import DePTModel, load_backbone
from pipeline.dept import DePTPrompt
from pipeline.errors import PipelineError
from pipeline.evaluate import Evaluation
from pipeline.tasks import get_task, load_task_splits
from pipeline.tasks.readers import read_rows


def inference_ds_config(path: str, world: int) -> dict:
    """The DeepSpeed config with a trivial batch geometry (DeepSpeed insists on one even without training)."""
    from pipeline.train import read_ds_config

    ds = read_ds_config(path)
    ds.update(train_batch_size=world, train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
    return ds


def load_for_inference(model: str, adapter: str, ds_config: str):
    """(module in eval mode, backbone, adapter config): the backbone sharded at load under ZeRO-3."""
    import deepspeed

    from pipeline.train import ds_dtype

    rank, world = distributed.init()
    adapter_cfg, tensors, _ = adapters.read_adapter(adapter)
    ds = inference_ds_config(ds_config, world)
    backbone = load_backbone(model, ds, ds_dtype(ds))
    adapters.check_fits(adapter_cfg, backbone.d_model, adapter_cfg.max_length, adapter)
    prompt = DePTPrompt(adapter_cfg)
    adapters.load_into(prompt, tensors)
    engine, *_ = deepspeed.initialize(model=DePTModel(backbone.model, prompt, backbone.is_encoder_decoder), config=ds)
    engine.module.eval()
    return engine.module, backbone, adapter_cfg


def rows_for(data: str, task_name: str | None) -> tuple[list[dict], object | None]:
    """Rendered rows from a JSONL/CSV/parquet file: raw hub-schema rows of `task_name`, or `source`[/`target`]."""
    raw = read_rows(data)
    if not raw:
        raise PipelineError(f"{data} holds no rows")
    task = get_task(task_name) if task_name else None
    if task is None:
        if "source" not in raw[0]:
            raise PipelineError(f"{data} has no 'source' column: add one or pass --task to render hub-schema rows")
        return [{"id": r.get("id", i), "source": r["source"], **({"target": str(r["target"])} if "target" in r else {})}
                for i, r in enumerate(raw)], None
    rendered = []
    for i, row in enumerate(raw):
        has_label = row.get(task.label_column) is not None
        if has_label:
            rendered.append({"id": row.get("idx", row.get("id", i)), **task.render(row)})
        else:  # unlabeled rows (e.g. GLUE test): render the source alone
            rendered.append({"id": row.get("idx", row.get("id", i)), "source": task.source(row)})
    return rendered, task


def predict(model: str, adapter: str, data: str, output: str, ds_config: str, task: str | None = None,
            batch_size: int = 32, max_new_tokens: int = 20, mode: str = "generate") -> dict:
    """Write `{id, prediction[, label]}` lines to `output` (atomically, rank 0) and return metrics (if labeled)."""
    module, backbone, adapter_cfg = load_for_inference(model, adapter, ds_config)
    rows, task_obj = rows_for(data, task)
    labeled = all("target" in r for r in rows)
    scorer = Evaluation(task_obj or _free_text_task(), [], [], backbone.tokenizer, backbone.is_encoder_decoder,
                        adapter_cfg.max_length, mode=mode, batch_size=batch_size, max_new_tokens=max_new_tokens)
    with torch.no_grad():
        predictions = scorer.predictions(module, [{**r, "target": r.get("target", "")} for r in rows])
    metrics = {}
    if labeled and task_obj is not None:
        metrics = scorer.metrics_from(predictions, rows)
    elif labeled:
        metrics = {"accuracy": 100.0 * sum(p == r["target"] for p, r in zip(predictions, rows)) / len(rows)}
    if distributed.rank() == 0:
        lines = [json.dumps({"id": r["id"], "prediction": p, **({"label": r["target"]} if "target" in r else {})})
                 for r, p in zip(rows, predictions)]
        atomic.write_text(output, "\n".join(lines) + "\n")
        if metrics:
            atomic.write_json(Path(output).with_suffix(".metrics.json"), metrics)
    return metrics


def evaluate(model: str, adapter: str, task: str, split: str, ds_config: str, data_dir: str | None = None,
             batch_size: int = 32, mode: str = "generate", max_rows: int | None = None) -> dict:
    """The task's metrics on one of its rule-made splits (train/validation/test)."""
    module, backbone, adapter_cfg = load_for_inference(model, adapter, ds_config)
    task_obj = get_task(task)
    rows = load_task_splits(task_obj, data_dir, splits=(split,))[split]
    rows = rows[:max_rows] if max_rows else rows
    scorer = Evaluation(task_obj, rows, [], backbone.tokenizer, backbone.is_encoder_decoder, adapter_cfg.max_length,
                        mode=mode, batch_size=batch_size)
    return scorer.validate(module, 0)


def _free_text_task():
    """Stand-in task for files without a task: free-text generation, no label set."""
    from pipeline.tasks import Task

    return Task(name="file", hub_path=None, hub_config=None, input_fields=("source",), label_column="target",
                labels=None, metrics=("accuracy",), split_rule="original", kind="classification")
