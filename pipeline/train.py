"""The training loop: DePT (or PT, LoRA, full fine-tuning) on a ZeRO-3-sharded backbone.

    dept train --model random:tiny-t5 --train_file data.jsonl --output_dir out --steps 50 --warmup_steps 5
    ./launch.sh train ...            # the same, on every local rank (2 CPU ranks without GPUs)

Reads top to bottom: backbone (sharded at creation) -> DePT module (fresh or from an init adapter) -> engine with
two learning rates -> resume from the newest checkpoint -> steps (log, evaluate and keep the best adapter,
checkpoint) -> final adapter -> test with the best adapter -> a `TrainResult`. Nothing here knows about recipes,
files of results or MLflow: `job.py` writes results.json, callers pass `callbacks` that receive logged metrics.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pipeline import adapters, atomic, distributed, engine, interrupts, logs, lora
from pipeline.backbone import Backbone, load_backbone, save_backbone
from pipeline.checkpoint import Checkpoints, restore_history, seed_step
from pipeline.config import DEFAULT_M, DEFAULT_R, DEFAULT_S, JobConfig
from pipeline.data import collate, global_batch, row_lengths, rows_at, training_rows
from pipeline.dept import DeptConfig, rank_for_budget
from pipeline.errors import PipelineError
from pipeline.faults import fault, hold, nan_at
from pipeline.interop import read_any_adapter
from pipeline.model import DePTModel, init_dept_prompt

log = logging.getLogger(__name__)
Callback = Callable[[int, dict], None]


@dataclass
class TrainResult:
    """What a training job produced (job.py writes it to results.json with the job's data description)."""

    final_loss: float | None
    best_step: int | None
    best_validation: float | None
    validation: dict  # metrics of the best validation
    test: dict  # metrics of the best adapter on the test split
    evals: list[dict]
    history: list[dict]  # logged training metrics
    skipped_steps: list[int]
    trainable_params: int
    total_params: int
    trainable_names: list[str]
    dept_shape: dict | None  # the resolved DeptConfig (None for finetune and lora)
    sharding: list[dict]
    probe: dict  # eval-mode loss on the first training rows: a fingerprint a reloaded adapter reproduces
    world_size: int
    notes: list[str] = field(default_factory=list)
    lora_shape: dict | None = None  # the resolved LoRA (method lora): r, alpha, targets, counts
    stopped_early: dict | None = None  # {"step", "reason"} when `should_stop` ended training (a pruned sweep trial)

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- the model


def resolve_shape(cfg: JobConfig, d_model: int, init: DeptConfig | None) -> tuple[DeptConfig, list[str]]:
    """The DePT shape of the job: explicit values, else the init adapter's, else the defaults (config.DEFAULT_M/R/S);
    `budget_tokens` computes r; method pt has r = 0. An explicit value that contradicts the init adapter is
    refused (the adapter's tensors could not be loaded). Returns the config and notes for the log."""
    args, notes = cfg.dept, []
    m, r, s = args.num_virtual_tokens, args.r, args.max_length
    if init is not None:
        args.refuse_other_shape(cfg.init_adapter, init.num_virtual_tokens, init.r)
        if m is None or r is None:
            notes.append(f"shape from the init adapter: m={init.num_virtual_tokens}, r={init.r}, s={init.max_length}")
        m, r = init.num_virtual_tokens, init.r
        s = init.max_length if s is None else s  # a different explicit s goes through on_length_mismatch
    m = DEFAULT_M if m is None else m
    s = DEFAULT_S if s is None else s
    if cfg.method == "pt":
        r = 0
    elif r is None:
        r = rank_for_budget(args.budget_tokens, m, s, d_model) if args.budget_tokens else DEFAULT_R
    shape = DeptConfig(
        num_virtual_tokens=m,
        r=r,
        max_length=s,
        d_model=d_model,
        lora_alpha=args.lora_alpha,
        prompt_init=args.prompt_init,
        init_text=args.init_text,
    )
    return shape, notes


def build_model(cfg: JobConfig, ds: dict) -> tuple[DePTModel, Backbone, DeptConfig | lora.LoraShape | None, list[str]]:
    """The backbone (sharded at creation under ZeRO-3; frozen unless finetune) with its DePT module in front, or
    with PEFT's LoRA pairs inside (method lora): (model, backbone, resolved shape or None for finetune, notes)."""
    backbone = load_backbone(
        cfg.model,
        ds,
        engine.dtype_of(ds),
        cfg.model_overrides,
        trainable=cfg.method == "finetune",
        seed=cfg.train.seed,
        allow_fp16_t5=cfg.train.allow_fp16_t5,
    )
    if cfg.method == "finetune":
        return DePTModel(backbone.model, None, backbone.is_encoder_decoder), backbone, None, []
    if cfg.method == "lora":
        init = lora.read_adapter(cfg.init_adapter) if cfg.init_adapter else None
        shape = lora.resolve_shape(
            cfg.lora, backbone.model, backbone.d_model, cfg.max_length, init.config if init else None
        )
        peft_model = lora.attach(backbone.model, shape, backbone.is_encoder_decoder, cfg.train.seed)
        if init is not None:
            lora.load_into(peft_model, init)  # before the engine exists, or its fp32 copy would win
        return DePTModel(peft_model, None, backbone.is_encoder_decoder), backbone, shape, shape.notes
    init_cfg = init_tensors = None
    if cfg.init_adapter:
        init_cfg, init_tensors, _ = read_any_adapter(cfg.init_adapter)
    shape, notes = resolve_shape(cfg, backbone.d_model, init_cfg)
    prompt = init_dept_prompt(shape, backbone, cfg.train.seed)
    if init_cfg is not None:
        init_cfg, init_tensors = adapters.fit_length(
            init_cfg, init_tensors, shape.max_length, cfg.on_length_mismatch, cfg.init_adapter
        )
        adapters.check_fits(init_cfg, backbone.d_model, shape.max_length, cfg.init_adapter)
        adapters.load_into(prompt, init_tensors)  # before the engine exists, or its fp32 copy would win
    return DePTModel(backbone.model, prompt, backbone.is_encoder_decoder), backbone, shape, notes


def param_groups(model: DePTModel, cfg: JobConfig) -> list[dict]:
    """Two groups with two learning rates (prompt, low-rank pair); one group for lora and for finetune."""
    if model.prompt is None:
        name, lr = ("lora", cfg.train.lr_lora) if cfg.method == "lora" else ("backbone", cfg.train.lr)
        return [{"name": name, "params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]
    return model.prompt.param_groups(cfg.train.lr_prompt, cfg.train.lr_lowrank)


# ----------------------------------------------------------------------------------------------- the loop


def train(
    cfg: JobConfig,
    rows,
    make_evaluator: Callable[[Backbone, int], object] | None = None,
    callbacks: list[Callback] = (),
    start_record: dict | None = None,
    separator: str | None = None,
    should_stop: Callable[[int, float], str | None] | None = None,
) -> TrainResult:
    """Train on `rows` ({source, target} dicts, or a `datasets.Dataset` with those columns: the rows stay in their
    memory-mapped file, and are tokenized once per node into another). Collective: every rank calls it with the same
    rows.

    `make_evaluator(backbone, max_length)` gives an object with `validate(module, step) -> dict` (with `score`, higher is
    better) and `test(module) -> dict` (`evaluation.Evaluator`): validation every `eval_every` steps (or once at
    the end); the best adapter is kept in `best_adapter/` and scores the test split. `start_record` (the job's
    fingerprint) is written to `<output_dir>/job.json` when training starts afresh: a later run resumes the
    checkpoints only when its own fingerprint matches it. `separator`: what decoder-only sequences put between source
    and target (None: the authors' " Label : "). `should_stop(step, validation score)`, called on every rank after
    each validation but the last, returns why to stop now (a sweep's pruner; the same answer on every rank) or None:
    training stops there, the best adapter so far scores the test split, and the result says `stopped_early`.
    """
    opts = cfg.train
    rank, world = engine.init_distributed(opts.comm_timeout_s)
    out = Path(cfg.output_dir)
    ds, stage_reason = engine.plan_stage(
        engine.training_ds_config(
            engine.read_ds_config(cfg.ds_config), opts.batch_size, opts.grad_accum, opts.grad_clip, world
        ),
        world,
        opts.sharding,
    )
    if rank == 0:
        log.info(stage_reason)
    model, backbone, shape, notes = build_model(cfg, ds)
    for note in notes:
        if rank == 0:
            log.info(note)
    if world > 1 and engine.zero_stage(ds) == 3 and opts.sharding == "auto":
        fits, figures = engine.whole_model_fits(model)
        if distributed.all_ranks(fits) and rank == 0:
            log.info("each rank could hold the whole model (%s): --sharding replicate trains faster", figures)
    trainable, total = engine.count_params(model)
    torch.set_num_threads(engine.cpu_threads(opts.cpu_threads, total - trainable))
    if rank == 0:
        log.info(
            "trainable parameters: %d of %d (%.4f%%); %d CPU thread(s) per rank",
            trainable,
            total,
            100 * trainable / max(total, 1),
            torch.get_num_threads(),
        )
    max_length = shape.max_length if shape else cfg.max_length
    evaluator = make_evaluator(backbone, max_length) if make_evaluator else None
    tokenized = training_rows(
        rows,
        backbone.tokenizer,
        backbone.is_encoder_decoder,
        max_length,
        opts.max_target_length,
        **({"separator": separator} if separator is not None else {}),
    )
    trainer = engine.training_engine(
        model, param_groups(model, cfg), ds, opts.weight_decay, opts.warmup_steps, opts.steps
    )
    sharding = engine.sharding_report(trainer.module.base_model)

    checkpoints = Checkpoints(out / "checkpoints", opts.keep_checkpoints)
    start, state = checkpoints.load(trainer)
    state = state or {"best_score": None, "best_step": None, "evals": [], "skipped_steps": []}
    history = restore_history(out / "metrics.jsonl", start, rank)
    if rank == 0 and start:
        log.info("resumed from step %d", start, extra=logs.ALWAYS_ON_CONSOLE)
    if rank == 0 and start_record is not None and not start:
        atomic.write_json(out / "job.json", start_record)

    lengths = row_lengths(tokenized) if opts.group_by_length else None
    pad_to = shape.max_length if (shape and opts.pad_to_max_length) else None
    pad_id = backbone.tokenizer.pad_token_id
    prompt_tokens = shape.num_virtual_tokens if isinstance(shape, DeptConfig) else 0
    save_adapter = _adapter_writer(shape, backbone.name)
    trainer.train()
    window = _Window(**state.pop("window", {}))  # a checkpoint between two log lines keeps the partial window
    cadence = _Cadence(opts, rank)
    stopped = None
    with _progress(rank, start, opts.steps) as progress, interrupts.at_step_boundaries():
        for step in range(start, opts.steps):
            tick = time.perf_counter()
            seed_step(opts.seed, step, rank)
            rates = trainer.learning_rates()  # the rates this step applies
            batches = [
                collate(rows_at(tokenized, ids), pad_id, backbone.is_encoder_decoder, pad_to)
                for ids in rank_micro_batches(
                    global_batch(len(tokenized), opts.batch_size, step, opts.seed, lengths),
                    rank,
                    world,
                    opts.grad_accum,
                )
            ]
            step_loss = _optimizer_step(trainer, batches, step, opts, state)
            tokens = sum(int(b["attention_mask"].sum()) + len(b["input_ids"]) * prompt_tokens for b in batches)
            done = step + 1
            window.add(distributed.mean_over_ranks(step_loss), tokens * world, time.perf_counter() - tick)
            progress.update(1)

            if done % opts.log_every == 0 or done == opts.steps:
                record = {
                    "step": done,
                    **window.flush(),
                    **{f"lr_{name}": lr for name, lr in rates.items()},
                    "peak_mem_mb": engine.peak_memory_mb(),
                }
                history.append(record)
                if rank == 0:
                    _append_jsonl(out / "metrics.jsonl", record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}")
                for callback in callbacks:
                    callback(done, record)
            if evaluator and opts.eval_every and (done % opts.eval_every == 0 or done == opts.steps):
                _validate(trainer.module, evaluator, done, state, out, save_adapter, callbacks)
                reason = should_stop(done, state["evals"][-1]["score"]) if should_stop and done < opts.steps else None
                if reason:
                    stopped = {"step": done, "reason": reason}
                    if rank == 0:
                        log.info("stopped at step %d: %s", done, reason, extra=logs.ALWAYS_ON_CONSOLE)
                    break
            # One all-reduce decides, on every rank alike, whether a signal stops the job here (any rank got one)
            # and whether the wall-clock cadence is due (rank 0's clock). #21
            signum, time_due = distributed.max_over_ranks([interrupts.pending(), cadence.time_due()])
            if (signum and cadence.enabled) or (cadence.due(done, bool(time_due)) and done < opts.steps):
                checkpoints.save(trainer, done, {**state, "window": vars(window)})
                cadence.saved()
                fault("DEPT_FAULT_KILL_AT_STEP", done, rank)  # a kill right after a complete checkpoint
            if signum:
                written = (
                    f"checkpoint written ({checkpoints.root / checkpoints.tag(done)})"
                    if cadence.enabled
                    else "no checkpoint (save_every 0): the re-run starts over"
                )
                raise interrupts.Interrupted(int(signum), done, opts.steps, written)
            fault("DEPT_FAULT_RAISE_AT_STEP", done, rank)
            fault("DEPT_FAULT_HANG_AT_STEP", done, rank)
            fault("DEPT_FAULT_SIGNAL_AT_STEP", done, rank)
            hold(done, rank)

    if evaluator and not opts.eval_every:
        _validate(trainer.module, evaluator, opts.steps, state, out, save_adapter, callbacks)
    save_adapter(trainer.module, out / "adapter")
    if cfg.save_model:
        save_backbone(backbone, out / "model", rank)
    probe = probe_loss(trainer.module, tokenized, backbone, pad_to)
    test = {}
    if evaluator:
        if shape is not None and state["best_step"] != opts.steps:
            _load_best(trainer, shape, out / "best_adapter")
        test = _test(trainer.module, evaluator, state["best_step"], callbacks)
    distributed.barrier()
    return TrainResult(
        final_loss=history[-1]["loss"] if history else None,
        best_step=state["best_step"],
        best_validation=state["best_score"],
        evals=state["evals"],
        history=history,
        test=test,
        validation=next((e for e in state["evals"] if e["step"] == state["best_step"]), {}),
        skipped_steps=state["skipped_steps"],
        trainable_params=trainable,
        total_params=total,
        trainable_names=[name for name, _ in trainer.trainable],
        dept_shape=shape.to_dict() if isinstance(shape, DeptConfig) else None,
        lora_shape=shape.to_dict() if isinstance(shape, lora.LoraShape) else None,
        sharding=sharding,
        probe=probe,
        world_size=world,
        notes=notes,
        stopped_early=stopped,
    )


def rank_micro_batches(global_ids: list[int], rank: int, world: int, grad_accum: int) -> list[list[int]]:
    """This rank's micro-batches of a global batch: accumulation step a takes slice a, and within it the ranks
    take consecutive parts (rank r of slice a: rows [(a * world + r) * micro, ... + micro))."""
    micro = len(global_ids) // (world * grad_accum)
    return [global_ids[(a * world + rank) * micro : (a * world + rank + 1) * micro] for a in range(grad_accum)]


def _optimizer_step(trainer, batches: list[dict], step: int, opts, state: dict) -> float:
    """Forward and backward over this rank's micro-batches, then the optimizer step (DeepSpeed steps at the
    accumulation boundary); returns this rank's share of the step's loss (`mean_over_ranks` of it is the step's
    loss). A non-finite loss on any rank stops the job, or skips the step.

    The loss of a step is the sum of the token losses over the whole global batch (every rank, every accumulation
    micro-batch) divided by the number of target tokens in that global batch, N, counted before the first backward
    (one all-reduce). DeepSpeed's `backward` divides each micro-batch's loss by grad_accum (G) and ZeRO averages the
    gradients over the W data-parallel ranks, so each micro-batch's summed token loss is divided by N / (G * W):
    after DeepSpeed's own scaling the gradient is exactly that of the whole-batch token mean, whatever the split
    (1 x 8, 1 x 4 x 2, 2 x 4 give the same step up to float error; the transformers Trainer's `num_items_in_batch`).
    The same rule for T5 and decoder-only, DePT, PT and finetune.
    """
    world = distributed.world_size()
    targets = distributed.sum_over_ranks(sum(trainer.module.count_targets(b["labels"]) for b in batches))
    denominator = max(targets, 1) / (len(batches) * world)
    total = 0.0
    for batch in batches:
        loss = trainer.forward({**batch, "loss_denominator": denominator})
        if nan_at(step + 1):
            loss = loss * float("nan")
        if distributed.any_rank(not torch.isfinite(loss).item()):
            if opts.on_nonfinite == "stop":
                raise PipelineError(
                    f"non-finite loss at step {step + 1}: lower the learning rates or use "
                    "on_nonfinite=skip; the last good adapter and checkpoint are kept"
                )
            log.warning("non-finite loss at step %d: step skipped", step + 1)
            state["skipped_steps"].append(step + 1)
            return total
        trainer.backward(loss)
        trainer.step()
        total += loss.item() / len(batches)  # summed over micro-batches and averaged over ranks: sum_all / N
    return total


class _Cadence:
    """When the loop writes a checkpoint. `save_every` N: every N steps; 0: never (not even when a signal stops the
    job); not given (None): every `save_every_minutes` of wall time by rank 0's clock and at the end of warm-up, so a
    default job preempted after days loses minutes. #21"""

    def __init__(self, opts, rank: int):
        self.every, self.minutes, self.warmup, self.rank = (
            opts.save_every,
            opts.save_every_minutes,
            opts.warmup_steps,
            rank,
        )
        self.last = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.every != 0

    def time_due(self) -> float:
        """1.0 when this rank's clock says a time-based checkpoint is due (only rank 0's is asked), else 0.0."""
        if self.every is not None or not self.minutes or self.rank != 0:
            return 0.0
        return float(time.monotonic() - self.last >= self.minutes * 60)

    def due(self, done: int, time_due: bool) -> bool:
        if self.every:
            return done % self.every == 0
        return self.every is None and (time_due or (self.warmup > 0 and done == self.warmup))

    def saved(self) -> None:
        self.last = time.monotonic()


class _Window:
    """Loss, tokens and time accumulated between two log lines."""

    def __init__(self, loss: float = 0.0, tokens: int = 0, seconds: float = 0.0, steps: int = 0):
        self.loss, self.tokens, self.seconds, self.steps = loss, tokens, seconds, steps

    def add(self, loss: float, tokens: int, seconds: float) -> None:
        self.loss, self.tokens, self.seconds, self.steps = (
            self.loss + loss,
            self.tokens + tokens,
            self.seconds + seconds,
            self.steps + 1,
        )

    def flush(self) -> dict:
        record = {
            "loss": self.loss / max(self.steps, 1),
            "tokens_per_s": self.tokens / max(self.seconds, 1e-9),
            "step_s": self.seconds / max(self.steps, 1),
        }
        self.__init__()
        return record


@torch.no_grad()
def probe_loss(module, rows, backbone, pad_to) -> dict:
    """Eval-mode loss and logits norm on the first 8 training rows: a fingerprint of the trained model that a
    reloaded adapter must reproduce (computed on every rank with the same batch)."""
    module.eval()
    batch = collate(
        rows_at(rows, range(min(8, len(rows)))), backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder, pad_to
    )
    out = module(**{k: v.to(next(module.parameters()).device) for k, v in batch.items()})
    module.train()
    return {"loss": out.loss.item(), "logits_norm": out.logits.float().norm().item()}


def _adapter_writer(shape, backbone_name: str):
    """`save(module, path, extra=None)` writing the job's adapter (DePT's format, or PEFT's for LoRA; collective),
    or nothing for finetune (its product is the backbone)."""
    if isinstance(shape, DeptConfig):
        return lambda module, path, extra=None: adapters.save_adapter(
            module.prompt, path, backbone_name, distributed.rank(), extra
        )
    if isinstance(shape, lora.LoraShape):
        return lambda module, path, extra=None: lora.save_adapter(
            module.base_model, path, shape, backbone_name, distributed.rank(), extra
        )
    return lambda module, path, extra=None: None


def _load_best(trainer, shape, path: Path) -> None:
    """Put the best adapter's tensors back into the live (partitioned) parameters, for the test evaluation."""
    if isinstance(shape, lora.LoraShape):
        best = lora.read_adapter(path).tensors
        trainer.overwrite(lora.as_param_names(best, trainer.module.base_model, "base_model."), prefix="")
    else:
        _, best, _ = adapters.read_adapter(path)
        trainer.overwrite(best, prefix="prompt.")


def _validate(module, evaluator, step, state, out, save_adapter, callbacks) -> None:
    module.eval()
    metrics = evaluator.validate(module, step)
    module.train()
    state["evals"].append({"step": step, **metrics})
    for callback in callbacks:
        callback(step, {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    if state["best_score"] is None or metrics["score"] > state["best_score"]:
        state["best_score"], state["best_step"] = metrics["score"], step
        save_adapter(module, out / "best_adapter", {"step": step})


def _test(module, evaluator, best_step, callbacks) -> dict:
    module.eval()
    metrics = evaluator.test(module)
    module.train()
    for callback in callbacks:
        callback(best_step or 0, {f"test_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _progress(rank: int, start: int, total: int):
    from tqdm import tqdm

    # In a log file (not a terminal) a bar redrawn many times a second buries everything else: redraw rarely.
    interval = 0.1 if sys.stderr.isatty() else 30
    return tqdm(total=total, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True, mininterval=interval)
