"""Using a trained adapter: predictions for a file, a task's metrics, and `load_dept` for Python.

    dept predict --model DIR --adapter RUN/best_adapter --data rows.jsonl --output preds.jsonl [--task rte]
    dept evaluate --model DIR --adapter RUN/best_adapter --task rte --split test

One process (the usual case) needs no DeepSpeed: the backbone is loaded whole with `from_pretrained`, the adapter
tensors are copied into a fresh DePT module, and the model runs on the GPU if there is one, else the CPU; it starts
in seconds. Under a launcher with several ranks the backbone is loaded sharded (ZeRO-3 inference engine) and rows are
split over the ranks. Either way the forward is the training-time one (`model.DePTModel`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline import adapters, atomic, distributed, engine, lora
from pipeline.backbone import Backbone, load_backbone
from pipeline.config import EvaluateArgs, PredictArgs
from pipeline.data import tokenize
from pipeline.dept import DePTPrompt
from pipeline.errors import PipelineError
from pipeline.evaluation import Evaluator, generate_predictions
from pipeline.interop import read_any_adapter
from pipeline.model import DePTModel
from pipeline.tasks import Task, load_task_splits
from pipeline.tasks.readers import read_rows
from pipeline.tasks.specs import task_from_spec


def several_ranks() -> bool:
    return distributed.world_size() > 1


def load_model(
    model: str, adapter: str, ds_config: str = "auto", seed: int = 42, device: str | None = None
) -> tuple[DePTModel, Backbone, object]:
    """(model in eval mode, backbone, adapter config). One process: no DeepSpeed, on `device` (default: cuda if
    available, else cpu). Several ranks: sharded under ZeRO-3 (collective). A LoRA adapter (PEFT's format) is
    put on the backbone by `PeftModel.from_pretrained`; its config's `max_length` is the input length it trained on."""
    is_lora = lora.is_lora_adapter(adapter)
    if is_lora:
        adapter_cfg = lora.read_adapter(adapter)
    else:
        adapter_cfg, tensors, _ = read_any_adapter(adapter)
    if several_ranks():
        _, world = engine.init_distributed()
        ds = engine.inference_ds_config(engine.read_ds_config(ds_config), world)
        backbone = load_backbone(model, ds, engine.dtype_of(ds), seed=seed)
    else:
        backbone = load_backbone(model, seed=seed)
    torch.set_num_threads(engine.cpu_threads(None, engine.count_params(backbone.model)[1]))
    if is_lora:
        net = DePTModel(lora.load_peft_model(backbone.model, adapter), None, backbone.is_encoder_decoder)
    else:
        adapters.check_fits(adapter_cfg, backbone.d_model, adapter_cfg.max_length, adapter)
        prompt = DePTPrompt(adapter_cfg)
        adapters.load_into(prompt, tensors)
        net = DePTModel(backbone.model, prompt, backbone.is_encoder_decoder)
    if several_ranks():
        return engine.inference_module(net, ds), backbone, adapter_cfg
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return net.to(device).eval(), backbone, adapter_cfg


class DeptPredictor:
    """A backbone with a trained DePT adapter, ready for Python: `generate(texts)` or `model(input_ids, mask)`.

    Texts are the model inputs as the tasks render them (`"premise: ... hypothesis: ..."`); the same tokenization and
    forward as training are used, so predictions match `dept predict`.
    """

    def __init__(self, model: DePTModel, backbone: Backbone, adapter_config):
        self.model, self.backbone, self.adapter_config = model, backbone, adapter_config
        self.tokenizer = backbone.tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        """The training-time forward: logits [batch, T, vocab] (T5: pass decoder_input_ids or labels)."""
        with torch.no_grad():
            return self.model(
                input_ids.to(self.device),
                attention_mask.to(self.device),
                **{k: v.to(self.device) for k, v in kwargs.items()},
            ).logits

    def generate(self, texts: list[str], max_new_tokens: int = 20, batch_size: int = 32) -> list[str]:
        """Greedy decoding of each text, by the loop evaluation and `dept predict` use."""
        rows = [{"source": text, "target": ""} for text in texts]
        tokenized = tokenize(rows, self.tokenizer, self.backbone.is_encoder_decoder, self.adapter_config.max_length)
        return generate_predictions(
            self.model, tokenized, self.tokenizer, self.backbone.is_encoder_decoder, batch_size, max_new_tokens
        )


def load_dept(model: str, adapter: str, device: str | None = None, seed: int = 42) -> DeptPredictor:
    """A trained adapter (DePT, prompt tuning or LoRA) on its backbone in one process, without DeepSpeed (CPU or GPU).

        from pipeline import load_dept
        model = load_dept("t5-base", "runs/x/adapter")
        model.generate(["premise: ... hypothesis: ..."])

    `seed` matters only for `random:<preset>` backbones: pass the training job's seed.
    """
    if several_ranks():
        raise PipelineError("load_dept runs in one process; under a launcher use `dept predict` instead")
    return DeptPredictor(*load_model(model, adapter, seed=seed, device=device))


def rows_for(data: str, task_name: str | None) -> tuple[list[dict], Task | None]:
    """Rendered rows from a JSONL/CSV/parquet file: rows in the columns of `task` (a registered task's hub schema,
    or a custom task YAML file's columns) rendered by its template, or `source`[/`target`/`id`] rows."""
    raw = read_rows(data)
    if not raw:
        raise PipelineError(f"{data} holds no rows")
    task = task_from_spec(task_name) if task_name else None
    if task is None:
        if "source" not in raw[0]:
            raise PipelineError(
                f"{data} has no 'source' column: add one (the model input text) or pass --task to "
                "render hub-schema rows"
            )
        return [
            {
                "id": r.get("id", i),
                "source": str(r["source"]),
                **({"target": str(r["target"])} if r.get("target") is not None else {}),
            }
            for i, r in enumerate(raw)
        ], None
    rendered = []
    for i, row in enumerate(raw):
        row_id = row.get("idx", row.get("id", i))
        if row.get(task.label_column) is not None:
            rendered.append({"id": row_id, **task.render(row)})
        else:  # unlabeled rows (e.g. GLUE test): render the source alone
            rendered.append({"id": row_id, "source": task.source(row)})
    return rendered, task


def _free_text_task() -> Task:
    """Stand-in task for files without a task: free-text generation, exact-match accuracy, no label set."""
    return Task(
        name="file",
        hub_path=None,
        hub_config=None,
        input_fields=("source",),
        label_column="target",
        labels=None,
        metrics=("accuracy",),
        split_rule="original",
        kind="classification",
    )


def predict(args: PredictArgs) -> dict:
    """Write `{id, prediction[, label]}` lines to `args.output` (atomically, rank 0) and return metrics when every
    row has a label (also written to `<output stem>.metrics.json`)."""
    rows, task = rows_for(args.data, args.task)
    if args.eval_mode == "score" and (task is None or not task.labels):
        raise PipelineError("--mode score ranks a task's label strings: pass --task with a classification task")
    model, backbone, adapter_cfg = load_model(args.model, args.adapter, args.ds_config, args.seed)
    labeled = all("target" in r for r in rows)
    scorer = Evaluator(
        task or _free_text_task(),
        [],
        [],
        backbone.tokenizer,
        backbone.is_encoder_decoder,
        adapter_cfg.max_length,
        mode=args.eval_mode,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    predictions = scorer.predictions(model, [{**r, "target": r.get("target", "")} for r in rows])
    metrics = scorer.metrics_from(predictions, rows) if labeled else {}
    if distributed.rank() == 0:
        lines = [
            json.dumps({"id": r["id"], "prediction": p, **({"label": r["target"]} if "target" in r else {})})
            for r, p in zip(rows, predictions)
        ]
        atomic.write_text(args.output, "\n".join(lines) + "\n")
        if metrics:
            atomic.write_json(metrics_path(args.output), metrics)
    return metrics


def metrics_path(output: str | Path) -> Path:
    return Path(output).with_suffix(".metrics.json")


def evaluate_adapter(args: EvaluateArgs) -> dict:
    """The task's metrics on one of its rule-made splits (train/validation/test)."""
    task = task_from_spec(args.task)
    rows = load_task_splits(task, args.data_dir, splits=(args.split,))[args.split]
    rows = rows[: args.max_rows] if args.max_rows else rows
    model, backbone, adapter_cfg = load_model(args.model, args.adapter, args.ds_config, args.seed)
    scorer = Evaluator(
        task,
        rows,
        [],
        backbone.tokenizer,
        backbone.is_encoder_decoder,
        adapter_cfg.max_length,
        mode=args.eval_mode,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
    )
    return scorer.validate(model, 0)
