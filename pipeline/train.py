"""The DeepSpeed training loop: DePT (or PT, or full fine-tuning) on a ZeRO-3-sharded backbone.

    python -m pipeline.cli train --model random:tiny-t5 --train_file data.jsonl --output_dir out
    ./launch.sh train ...            # same, on all local ranks (CPU: NPROC=2)

Reads top to bottom: config -> backbone (sharded at creation) -> DePT module -> engine with two learning rates
-> resume -> steps (evaluate, keep the best adapter, checkpoint) -> final adapter and results.json.
Nothing here knows about recipes or MLflow: callers pass `callbacks` that receive the logged metrics.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from pipeline import adapters, atomic, distributed
from pipeline.backbone import Backbone, DePTModel, embedding_rows, load_backbone
from pipeline.data import collate, global_batch, tokenize
from pipeline.dept import DePTPrompt, DeptConfig, init_prompt_, prompt_init_ids, rank_for_budget
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)
METHODS = ("dept", "pt", "finetune")


@dataclass
class TrainConfig:
    """Everything one training run needs. Defaults follow the paper (DEPT.md) where it has a value."""

    model: str = field(metadata={"help": "hub name, local model dir, or random:<preset>"})
    output_dir: str = field(metadata={"help": "run directory: adapters, checkpoints, results.json"})
    ds_config: str = field(default="ds_configs/zero3_cpu.json", metadata={"help": "DeepSpeed JSON config"})
    method: str = field(default="dept", metadata={"help": "dept | pt (r = 0) | finetune (all weights)"})
    num_virtual_tokens: int = field(default=60, metadata={"help": "m, prompt length"})
    r: int = field(default=30, metadata={"help": "rank of A @ B (ignored, 0, for pt)"})
    budget_tokens: int | None = field(default=None, metadata={"help": "l: set r to spend the budget of PT with l tokens"})
    max_length: int = field(default=256, metadata={"help": "s, longest input (tokens); rows of A"})
    max_target_length: int = field(default=32, metadata={"help": "longest target (tokens)"})
    lora_alpha: float = 8.0
    prompt_init: str = "TEXT"
    init_text: str = "Classify the input and answer with the label of the task."
    lr_prompt: float = field(default=3e-1, metadata={"help": "learning rate of the prompt"})
    lr_lowrank: float = field(default=1e-4, metadata={"help": "learning rate of A and B"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate of the backbone (finetune only)"})
    weight_decay: float = 0.0
    batch_size: int = field(default=32, metadata={"help": "global batch (all ranks, all accumulation steps)"})
    grad_accum: int = 1
    steps: int = 1000
    warmup_steps: int = 500
    grad_clip: float = 1.0
    seed: int = 42
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    pad_to_max_length: bool = field(default=False, metadata={"help": "pad every input to s (the authors' setting)"})
    group_by_length: bool = field(default=False, metadata={"help": "batch rows of similar length together"})
    init_adapter: str | None = None
    model_overrides: dict | None = None
    on_nonfinite: str = field(default="stop", metadata={"help": "stop | skip a step whose loss is NaN/inf"})
    on_length_mismatch: str = field(default="error", metadata={"help": "init adapter's s differs: error | truncate | pad A"})
    save_model: bool = field(default=False, metadata={"help": "finetune: save the trained backbone to <output_dir>/model"})
    comm_timeout_s: float = 1800.0

    def __post_init__(self):
        if self.method not in METHODS:
            raise PipelineError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.method == "pt":
            self.r = 0
        for name in ("batch_size", "grad_accum", "steps", "max_length", "max_target_length", "log_every"):
            if int(getattr(self, name)) < 1:
                raise PipelineError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if int(getattr(self, name)) < 0:
                raise PipelineError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints < 1:
            raise PipelineError("keep_checkpoints must be at least 1 (the newest good checkpoint is always kept)")
        if self.on_nonfinite not in ("stop", "skip"):
            raise PipelineError(f"on_nonfinite must be stop or skip, got {self.on_nonfinite!r}")
        if self.on_nonfinite == "skip" and self.grad_accum > 1:
            raise PipelineError("on_nonfinite=skip needs grad_accum 1 (a skipped micro-batch would shift "
                                "DeepSpeed's accumulation boundary): use on_nonfinite=stop")
        if self.on_length_mismatch not in ("error", "truncate", "pad"):
            raise PipelineError(f"on_length_mismatch must be error, truncate or pad, got {self.on_length_mismatch!r}")
        if self.save_model and self.method != "finetune":
            raise PipelineError("save_model applies to method finetune only (DePT and PT leave the backbone unchanged)")
        if self.method != "finetune" and self.num_virtual_tokens == 0 and self.r == 0:
            raise PipelineError(f"{self.method} with m = 0 and r = 0 has nothing to train: set num_virtual_tokens (m) "
                                "or, for dept, lora_rank (r) above 0")

    def dept_config(self, d_model: int) -> DeptConfig:
        if self.budget_tokens is not None and self.method == "dept":
            self.r = rank_for_budget(self.budget_tokens, self.num_virtual_tokens, self.max_length, d_model)
        return DeptConfig(num_virtual_tokens=self.num_virtual_tokens, r=self.r, max_length=self.max_length,
                          d_model=d_model, lora_alpha=self.lora_alpha, prompt_init=self.prompt_init,
                          init_text=self.init_text)


def read_ds_config(path: str) -> dict:
    """The user's DeepSpeed JSON, checked to exist and parse."""
    file = Path(path)
    if not file.is_file():
        raise PipelineError(f"DeepSpeed config {path} does not exist: pass one of ds_configs/*.json")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"DeepSpeed config {path} is not valid JSON ({err.msg}, line {err.lineno})") from None


def load_ds_config(path: str, cfg: TrainConfig, world: int) -> dict:
    """The user's DeepSpeed JSON with batch geometry and clipping filled in from the run's config."""
    ds = read_ds_config(path)
    per_step = world * cfg.grad_accum
    if cfg.batch_size % per_step:
        raise PipelineError(f"batch_size {cfg.batch_size} is not divisible by world_size {world} x grad_accum "
                            f"{cfg.grad_accum}: choose a multiple of {per_step}")
    ds["train_batch_size"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size // per_step
    ds["gradient_clipping"] = cfg.grad_clip
    ds.setdefault("steps_per_print", 10**9)  # we print our own progress
    return ds


def ds_dtype(ds: dict) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def warmup_then_linear_decay(warmup: int, total: int) -> Callable[[int], float]:
    """Factor on each group's own rate: linear warmup from 0, then linear decay to 0 at `total` steps."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def build_model(cfg: TrainConfig, ds: dict) -> tuple[DePTModel, Backbone]:
    """Backbone (sharded at creation under ZeRO-3, frozen unless finetune) plus an initialised DePT module."""
    torch.manual_seed(cfg.seed)  # random: backbones are initialised identically on every rank and world size
    backbone = load_backbone(cfg.model, ds, ds_dtype(ds), cfg.model_overrides, trainable=cfg.method == "finetune")
    if cfg.method == "finetune":
        return DePTModel(backbone.model, None, backbone.is_encoder_decoder), backbone
    dept_cfg = cfg.dept_config(backbone.d_model)
    torch.manual_seed(cfg.seed)  # A's kaiming init must be the same on every rank
    prompt = DePTPrompt(dept_cfg)
    vocab = backbone.model.get_input_embeddings().num_embeddings
    ids = prompt_init_ids(dept_cfg, backbone.tokenizer, vocab, cfg.seed)
    init_prompt_(prompt, None if ids is None else embedding_rows(backbone, ids), cfg.seed)
    if cfg.init_adapter:
        adapter_cfg, tensors, _ = adapters.read_adapter(cfg.init_adapter)
        adapter_cfg, tensors = adapters.fit_length(adapter_cfg, tensors, cfg.max_length, cfg.on_length_mismatch,
                                                   cfg.init_adapter)
        adapters.check_fits(adapter_cfg, backbone.d_model, cfg.max_length, cfg.init_adapter)
        if (adapter_cfg.num_virtual_tokens, adapter_cfg.r) != (dept_cfg.num_virtual_tokens, dept_cfg.r):
            raise PipelineError(f"adapter {cfg.init_adapter} has m={adapter_cfg.num_virtual_tokens}, r={adapter_cfg.r} "
                                f"but this run uses m={dept_cfg.num_virtual_tokens}, r={dept_cfg.r}: match them")
        adapters.load_into(prompt, tensors)
    return DePTModel(backbone.model, prompt, backbone.is_encoder_decoder), backbone


def param_groups(model: DePTModel, cfg: TrainConfig) -> list[dict]:
    """Two groups with two learning rates (prompt, low-rank pair); one group for finetune."""
    if model.prompt is None:
        return [{"name": "backbone", "params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr}]
    groups = []
    if model.prompt.prompt_parameters():
        groups.append({"name": "prompt", "params": model.prompt.prompt_parameters(), "lr": cfg.lr_prompt})
    if model.prompt.lowrank_parameters():
        groups.append({"name": "lowrank", "params": model.prompt.lowrank_parameters(), "lr": cfg.lr_lowrank})
    return groups


def count_params(model: DePTModel) -> tuple[int, int]:
    """(trainable, total) element counts; ZeRO-3 parameters report their full size via ds_numel."""
    def numel(p):
        return getattr(p, "ds_numel", p.numel())

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


class Checkpoints:
    """Resumable checkpoints in `<output_dir>/checkpoints/<tag>`: DeepSpeed's trainable state (frozen backbone
    excluded), each rank's RNG state, and a `complete` marker; `latest` names the newest complete one and moves
    only after the marker is written, so a checkpoint interrupted mid-write is never resumed from."""

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = root, keep

    def latest(self) -> str | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        tag = pointer.read_text().strip()
        return tag if (self.root / tag / "complete").exists() else None

    def save(self, engine, step: int, rank: int, run_state: dict) -> None:
        tag = f"step-{step:08d}"
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"step": step, "run_state": run_state},
                               save_latest=False,
                               exclude_frozen_parameters=True)
        torch.save(rng_state(), self.root / tag / f"rng_rank{rank}.pt")
        _fault("DEPT_FAULT_KILL_IN_CHECKPOINT", step, rank)
        distributed.barrier()
        if rank == 0:
            atomic.write_text(self.root / tag / "complete", f"{step}\n")
            atomic.write_text(self.root / "latest", tag + "\n")
            self._prune(keep_tag=tag)
        distributed.barrier()

    def _prune(self, keep_tag: str) -> None:
        """Keep the newest `keep` complete checkpoints; drop leftovers of interrupted writes."""
        complete = sorted(p.name for p in self.root.glob("step-*") if (p / "complete").exists())
        doomed = [tag for tag in complete[: -self.keep] if tag != keep_tag]
        doomed += [p.name for p in self.root.glob("step-*") if not (p / "complete").exists()]
        for tag in doomed:
            shutil.rmtree(self.root / tag, ignore_errors=True)

    def load(self, engine, rank: int) -> tuple[int, dict | None]:
        """(step, run state) of the newest complete checkpoint, or (0, None) to start fresh."""
        tag = self.latest()
        if tag is None:
            return 0, None
        _, client = engine.load_checkpoint(str(self.root), tag=tag, load_module_strict=False,
                                           load_optimizer_states=True, load_lr_scheduler_states=True)
        rng_file = self.root / tag / f"rng_rank{rank}.pt"
        if rng_file.exists():
            set_rng_state(torch.load(rng_file, weights_only=True))
        return int(client["step"]), client["run_state"]


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _fault(variable: str, step: int, rank: int) -> None:
    """Test hooks that prove crashes lose nothing and failures do not hang: at the step named by `variable`,
    rank $DEPT_FAULT_RANK (default 0) is SIGKILLed (`*_KILL_*`), raises (`DEPT_FAULT_RAISE_AT_STEP`) or hangs
    (`DEPT_FAULT_HANG_AT_STEP`)."""
    if os.environ.get(variable) != str(step) or rank != int(os.environ.get("DEPT_FAULT_RANK", "0")):
        return
    if "HANG" in variable:
        time.sleep(10**6)
    if "RAISE" in variable:
        raise RuntimeError(f"injected failure on rank {rank} at step {step}")
    os.kill(os.getpid(), signal.SIGKILL)


def peak_memory_mb() -> float:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu":
        return accel.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(cfg: TrainConfig, train_rows: list[dict], make_evaluation: Callable[[Backbone], object] | None = None,
          callbacks: list[Callable[[int, dict], None]] = ()) -> dict:
    """Train on `train_rows` ({source, target} dicts); returns {"results" (as in results.json), "engine",
    "backbone"}.

    `make_evaluation(backbone)` gives an object with `validate(module, step) -> dict` (with a `score`, higher is
    better) and `test(module) -> dict` (e.g. `pipeline.evaluate.Evaluation`), called on every rank: validation
    every `eval_every` steps and at the end; the best adapter is kept in `best_adapter/` and scores the test split.
    """
    import deepspeed

    rank, world = distributed.init(cfg.comm_timeout_s)
    out = Path(cfg.output_dir)
    ds = load_ds_config(cfg.ds_config, cfg, world)
    model, backbone = build_model(cfg, ds)
    trainable, total = count_params(model)
    if rank == 0:
        log.info("trainable parameters: %d of %d (%.4f%%)", trainable, total, 100 * trainable / max(total, 1))
    evaluation = make_evaluation(backbone) if make_evaluation else None
    rows = tokenize(train_rows, backbone.tokenizer, backbone.is_encoder_decoder, cfg.max_length,
                    cfg.max_target_length)

    groups = param_groups(model, cfg)
    optimizer = torch.optim.AdamW(groups, eps=1e-6, weight_decay=cfg.weight_decay)
    schedule = warmup_then_linear_decay(cfg.warmup_steps, cfg.steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
    )
    group_names = [g["name"] for g in groups]
    device = engine.device
    sharding = sharding_report(engine.module.backbone)

    checkpoints = Checkpoints(out / "checkpoints", cfg.keep_checkpoints)
    start, state = checkpoints.load(engine, rank)
    state = state or {"best_score": None, "best_step": None, "evals": []}
    history = _restore_history(out / "metrics.jsonl", start, rank)
    if rank == 0 and start:
        log.info("resumed from step %d", start)

    micro = cfg.batch_size // (world * cfg.grad_accum)
    lengths = [len(r["input_ids"]) for r in rows] if cfg.group_by_length else None
    pad_to = cfg.max_length if cfg.pad_to_max_length else None
    pad_id = backbone.tokenizer.pad_token_id
    engine.train()
    progress = _progress(rank, start, cfg.steps)
    window = {"loss": 0.0, "tokens": 0, "time": 0.0, "steps": 0}
    nan_fault_step = int(os.environ.get("DEPT_FAULT_NAN_AT_STEP", "0"))
    for step in range(start, cfg.steps):
        tick = time.perf_counter()
        lrs = engine.get_lr()  # the rates this step applies, one per group
        batch_ids = global_batch(len(rows), cfg.batch_size, step, cfg.seed, lengths)
        step_loss, tokens = 0.0, 0
        for accum in range(cfg.grad_accum):
            first = (accum * world + rank) * micro
            batch = collate([rows[i] for i in batch_ids[first:first + micro]], pad_id, backbone.is_encoder_decoder,
                            pad_to)
            tokens += int(batch["attention_mask"].sum()) + micro * (cfg.num_virtual_tokens if model.prompt else 0)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = engine(**batch).loss
            if step + 1 == nan_fault_step:  # test hook: a NaN loss on demand
                loss = loss * float("nan")
            if distributed.any_rank(not torch.isfinite(loss).item()):
                if cfg.on_nonfinite == "stop":
                    raise PipelineError(f"non-finite loss at step {step + 1}: lower the learning rates or use "
                                        "on_nonfinite=skip; the last good adapter and checkpoint are kept")
                log.warning("non-finite loss at step %d: step skipped", step + 1)
                state.setdefault("skipped_steps", []).append(step + 1)
                break
            engine.backward(loss)
            engine.step()
            step_loss += loss.item() / cfg.grad_accum
        done = step + 1
        window["loss"] += distributed.mean_over_ranks(step_loss)
        window["tokens"] += tokens * world
        window["time"] += time.perf_counter() - tick
        window["steps"] += 1
        progress.update(1)

        if done % cfg.log_every == 0 or done == cfg.steps:
            record = {"step": done, "loss": window["loss"] / window["steps"],
                      **{f"lr_{name}": lr for name, lr in zip(group_names, lrs)},
                      "tokens_per_s": window["tokens"] / max(window["time"], 1e-9), "peak_mem_mb": peak_memory_mb()}
            window = {"loss": 0.0, "tokens": 0, "time": 0.0, "steps": 0}
            history.append(record)
            if rank == 0:
                _append_jsonl(out / "metrics.jsonl", record)
                progress.set_postfix(loss=f"{record['loss']:.4f}",
                                     **{k: f"{v:.2e}" for k, v in record.items() if k.startswith("lr_")})
            for callback in callbacks:
                callback(done, record)

        if evaluation and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            _evaluate_and_keep_best(engine.module, evaluation, done, state, out, backbone, rank, callbacks)
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps:
            checkpoints.save(engine, done, rank, state)
            _fault("DEPT_FAULT_KILL_AT_STEP", done, rank)  # a kill right after a complete checkpoint
        for hook in ("DEPT_FAULT_RAISE_AT_STEP", "DEPT_FAULT_HANG_AT_STEP"):
            _fault(hook, done, rank)
    progress.close()

    if evaluation and not cfg.eval_every:
        _evaluate_and_keep_best(engine.module, evaluation, cfg.steps, state, out, backbone, rank, callbacks)
    if model.prompt is not None:
        adapters.save_adapter(engine.module.prompt, out / "adapter", backbone.name, rank)
    if cfg.save_model:
        save_full_backbone(engine.module.backbone, backbone.tokenizer, out / "model", rank)
    probe = probe_loss(engine.module, rows, backbone, pad_to)
    test = {}
    if evaluation:
        if model.prompt is not None and state["best_step"] != cfg.steps:
            _, best, _ = adapters.read_adapter(out / "best_adapter")
            adapters.load_into_engine(engine.module.prompt, best)
        test = _test(engine.module, evaluation, state["best_step"], callbacks)
    results = {
        "config": asdict(cfg), "world_size": world, "trainable_params": trainable, "total_params": total,
        "final_loss": history[-1]["loss"] if history else None, "best_step": state["best_step"],
        "best_validation": state["best_score"], "evals": state["evals"], "history": history, "test": test,
        "validation": next((e for e in state["evals"] if e["step"] == state["best_step"]), {}),
        "skipped_steps": state.get("skipped_steps", []),
        "sharding": sharding, "trainable_names": [n for n, p in engine.module.named_parameters() if p.requires_grad],
        "probe": probe,
    }
    if rank == 0:
        atomic.write_json(out / "results.json", results)
    distributed.barrier()
    return {"results": results, "engine": engine, "backbone": backbone}


def save_full_backbone(net, tokenizer, path: Path, rank: int) -> None:
    """Gather every parameter and save a `from_pretrained` directory on rank 0 (the finetune stage's product).
    Gathers the whole model at once: fine for the quickstart's tiny models; large models want
    `stage3_gather_16bit_weights_on_model_save` and `engine.save_16bit_model` instead."""
    from pipeline.backbone import gathered

    with gathered(list(net.parameters())):
        if rank == 0:
            state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
            with atomic.replace_dir(path) as tmp:
                net.save_pretrained(tmp, state_dict=state)
                tokenizer.save_pretrained(tmp)
    distributed.barrier()


def sharding_report(backbone) -> list[dict]:
    """Per rank: the share of the backbone it holds (ZeRO-3 partitions: `ds_tensor` vs the full `ds_numel`)."""
    held = full = 0
    smallest = largest = None
    for param in backbone.parameters():
        total = getattr(param, "ds_numel", param.numel())
        local = param.ds_tensor.numel() if hasattr(param, "ds_tensor") else param.numel()
        held, full = held + local, full + total
        share = local / total
        smallest = share if smallest is None else min(smallest, share)
        largest = share if largest is None else max(largest, share)
    mine = {"rank": distributed.rank(), "held_elements": held, "full_elements": full, "held_fraction": held / full,
            "min_param_fraction": smallest, "max_param_fraction": largest}
    return distributed.gather_objects([mine])


@torch.no_grad()
def probe_loss(module, rows, backbone, pad_to) -> dict:
    """Eval-mode loss and logits norm on the first 8 training rows: a fingerprint of the trained model that a
    reloaded adapter must reproduce (computed on every rank with the same batch)."""
    module.eval()
    batch = collate(rows[:8], backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder, pad_to)
    out = module(**{k: v.to(next(module.parameters()).device) for k, v in batch.items()})
    module.train()
    return {"loss": out.loss.item(), "logits_norm": out.logits.float().norm().item()}


def _test(module, evaluation, best_step, callbacks) -> dict:
    module.eval()
    metrics = evaluation.test(module)
    module.train()
    for callback in callbacks:
        callback(best_step or 0, {f"test_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    return metrics


def _evaluate_and_keep_best(module, evaluation, step, state, out, backbone, rank, callbacks):
    module.eval()
    metrics = evaluation.validate(module, step)
    module.train()
    state["evals"].append({"step": step, **metrics})
    for callback in callbacks:
        callback(step, {f"eval_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))})
    if state["best_score"] is None or metrics["score"] > state["best_score"]:
        state["best_score"], state["best_step"] = metrics["score"], step
        if module.prompt is not None:
            adapters.save_adapter(module.prompt, out / "best_adapter", backbone.name, rank, {"step": step})


def _restore_history(path: Path, start: int, rank: int) -> list[dict]:
    """Metrics logged up to the resumed step (a crash may have logged past the last checkpoint)."""
    if not path.exists():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the crash
        if record["step"] <= start:
            kept.append(record)
    if rank == 0:
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _append_jsonl(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def _progress(rank: int, start: int, total: int):
    import sys

    from tqdm import tqdm

    # In a log file (not a terminal) a bar redrawn many times a second buries everything else: redraw rarely.
    interval = 0.1 if sys.stderr.isatty() else 30
    return tqdm(total=total, initial=start, disable=rank != 0, desc="train", dynamic_ncols=True, mininterval=interval)
