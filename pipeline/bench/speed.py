"""`dept bench --mode speed` (#24): what the pipeline's own machinery costs next to plain PyTorch, side by side.

    dept bench --mode speed                                   # stories260K's geometry (the quickstart's step)
    dept bench --mode speed --model stories260K,random:t5-base --steps 6 --startup_runs 2
    NPROC=2 ./launch.sh bench --mode speed                    # 2 ranks: ZeRO-3 vs replicate; evaluation

For each model of `--model` (comma-separated), in one process, on one set of weights copied three times:
  step     `dept train`'s step (the engine `engine.plan_stage` picks for one process: stage 0, `PlainEngine`), a
           plain PyTorch loop (the same DePT module, AdamW with the same groups, backward, clip, step) and DeepSpeed's
           ZeRO-3 engine (what one process ran before #24), interleaved round by round on the same batch; the
           ratios are taken within each round, then their median.
  eval     `evaluation.generate_predictions` (what evaluation and `dept predict` run) on the stage-0 model, on the
           ZeRO-3 model gathered once and per layer (DEPT_GATHER_FRACTION=0: ZeRO-3's hooks for every token), and a
           plain loop of transformers' greedy `generate` on the same DePT inputs (prompt and offset as input
           embeddings), same rows, batch size and new tokens; interleaved repeats.
  startup  seconds from spawning `dept train` (one process) to the start of its first step: the default (stage 0)
           vs `--sharding zero3` (a process group, DeepSpeed's import, ZeRO-3 construction and hooks), and the floor
           under both: a plain script that imports torch and transformers and loads the tokenizer and the model
           with `from_pretrained` (models on disk only), to the moment it has them; interleaved.
Under a launcher with several ranks: the step of ZeRO-3 (the default) vs `--sharding replicate` (the whole model on
every rank, `PlainEngine` with the trainable gradients averaged), each rank its half of the global batch, and
evaluation on the backbone built sharded, gathered once vs per layer.
Timing on a shared machine: rounds interleave the variants so that a slow spell hits all alike; read the ratios.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline import atomic, distributed, engine
from pipeline.backbone import load_backbone
from pipeline.bench.settings import REPO, SpeedArgs
from pipeline.data import collate, global_batch, tokenize
from pipeline.dept import DeptConfig
from pipeline.evaluation import generate_predictions
from pipeline.model import DePTModel, init_dept_prompt
from pipeline.resources import model_location
from pipeline.tasks import load_task_splits

log = logging.getLogger("pipeline.bench")
TASK = "stories-who"  # generated rows (no data files): the quickstart's task
RANK_R = 1  # the quickstart's --lora_rank


def run_speed(args: SpeedArgs) -> dict | None:
    rank, world = engine.init_distributed(process_group=True)
    models = [m for m in args.model.split(",") if m]
    results = {"settings": {k: getattr(args, k) for k in args.__dataclass_fields__}, "world": world, "models": {}}
    for model in models:
        if world == 1:
            results["models"][model] = _one_process(args, model)
        else:
            results["models"][model] = _ranks(args, model)
    if rank != 0:
        return None
    table = speed_table(results)
    print(table)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "bench.json", results)
    atomic.write_text(out / "bench.md", "# dept bench --mode speed\n\n" + table + "\n\n" + NOTES + "\n")
    return results


def _rows(args: SpeedArgs, backbone) -> tuple[list[dict], list[dict]]:
    splits = load_task_splits(TASK)
    train_rows = tokenize(splits["train"], backbone.tokenizer, backbone.is_encoder_decoder, args.max_length, 8)
    eval_rows = tokenize(
        splits["validation"][: args.eval_rows], backbone.tokenizer, backbone.is_encoder_decoder, args.max_length
    )
    return train_rows, eval_rows


def _models(args: SpeedArgs, model: str, ds_config: dict | None):
    """(backbone, DePT model) built whole (ds_config None) or sharded under ZeRO-3."""
    backbone = load_backbone(model, ds_config, engine.dtype_of(ds_config or {}), seed=args.seed)
    shape = DeptConfig(num_virtual_tokens=args.ms[0], r=RANK_R, max_length=args.max_length, d_model=backbone.d_model)
    prompt = init_dept_prompt(shape, backbone, args.seed)
    return backbone, DePTModel(backbone.model, prompt, backbone.is_encoder_decoder)


def _one_process(args: SpeedArgs, model: str) -> dict:
    base = engine.training_ds_config(engine.read_ds_config(args.ds_config), args.batch_size, 1, 1.0, 1)
    stage0, why = engine.plan_stage(base, 1)
    backbone, ours = _models(args, model, None)
    # the threads `dept train` would use (one below 100M parameters: README, "Threads")
    torch.set_num_threads(engine.cpu_threads(None, engine.count_params(backbone.model)[1]))
    plain, zero3 = copy.deepcopy(ours), copy.deepcopy(ours)
    groups = ours.prompt.param_groups(args.lr_prompt, args.lr_lowrank)
    trainers = {
        "dept train (stage 0)": engine.training_engine(ours, groups, stage0, 0.0, 0, 10**9),
        "plain PyTorch loop": _PlainLoop(plain, args),
        "ZeRO-3 engine": engine.Engine(
            zero3, zero3.prompt.param_groups(args.lr_prompt, args.lr_lowrank), base, 0.0, 0, 10**9
        ),
    }
    train_rows, eval_rows = _rows(args, backbone)
    steps, losses = _step_rounds(args, trainers, train_rows, backbone)
    modules = {
        "evaluator, stage 0": trainers["dept train (stage 0)"].module,
        "evaluator, ZeRO-3 gathered once": trainers["ZeRO-3 engine"].module,
        "evaluator, ZeRO-3 per layer": trainers["ZeRO-3 engine"].module,
        "plain generate loop": trainers["plain PyTorch loop"].module,
    }
    evals = _eval_rounds(args, modules, eval_rows, backbone)
    startup = _startup(args, model) if args.startup_runs else {}
    return {
        "stage_choice": why,
        "step": {"reference": "plain PyTorch loop", "seconds": steps, "losses": losses},
        "eval": {"reference": "plain generate loop", "seconds": evals, "rows": len(eval_rows)},
        "startup": {"reference": FLOOR if FLOOR in startup else "dept train (stage 0)", "seconds": startup},
    }


def _step_rounds(args: SpeedArgs, trainers: dict, train_rows: list[dict], backbone) -> tuple[dict, dict]:
    """({trainer: step seconds}, {trainer: losses}) over --steps rounds after --warmup, the trainers in a rotating
    order each round, all on the same global batch, each rank its share of it; a step's time is the slowest
    rank's and its loss the mean over the ranks (on one process: its own)."""
    pad = backbone.tokenizer.pad_token_id
    rank, world = distributed.rank(), distributed.world_size()
    steps = {name: [] for name in trainers}
    losses = {name: [] for name in trainers}
    for round_ in range(args.warmup + args.steps):
        ids = global_batch(len(train_rows), args.batch_size, round_, args.seed)[rank::world]
        batch = collate([train_rows[i] for i in ids], pad, backbone.is_encoder_decoder)
        names = list(trainers)
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            trainer = trainers[name]
            trainer.train()
            distributed.barrier()
            tick = time.perf_counter()
            loss = trainer.forward(batch)
            trainer.backward(loss)
            trainer.step()
            seconds = _slowest_rank(time.perf_counter() - tick)
            if round_ >= args.warmup:
                steps[name].append(seconds)
                losses[name].append(distributed.mean_over_ranks(loss.item()))
    return steps, losses


def _eval_rounds(args: SpeedArgs, modules: dict, rows: list[dict], backbone) -> dict:
    seconds = {name: [] for name in modules}
    before = os.environ.get(engine.GATHER_FRACTION_ENV)
    for repeat in range(args.infer_repeats):
        names = list(modules)
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            module = modules[name]
            module.eval()
            per_layer = name.endswith("per layer")
            os.environ[engine.GATHER_FRACTION_ENV] = "0" if per_layer else (before or str(engine.GATHER_FRACTION))
            tick = time.perf_counter()
            if name == "plain generate loop":
                _plain_generate(module, rows, backbone, args)
            elif name == ALONE:
                _alone(module, rows, backbone, args)
            else:
                generate_predictions(
                    module, rows, backbone.tokenizer, backbone.is_encoder_decoder, args.eval_batch, args.infer_tokens
                )
            seconds[name].append(_slowest_rank(time.perf_counter() - tick))
    if before is None:
        os.environ.pop(engine.GATHER_FRACTION_ENV, None)
    else:
        os.environ[engine.GATHER_FRACTION_ENV] = before
    return seconds


@torch.no_grad()
def _plain_generate(module: DePTModel, rows: list[dict], backbone, args: SpeedArgs) -> None:
    """transformers' greedy `generate` on the DePT inputs (prompt and offset as embeddings): the reference loop."""
    pad = backbone.tokenizer.pad_token_id
    for start in range(0, len(rows), args.eval_batch):
        batch = collate(rows[start : start + args.eval_batch], pad, backbone.is_encoder_decoder, for_generation=True)
        embeds, mask, _ = module._inputs(batch["input_ids"], batch["attention_mask"])
        module.base_model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=args.infer_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad,
        )


def _slowest_rank(seconds: float) -> float:
    return max(distributed.gather_objects([seconds]))


def _ranks(args: SpeedArgs, model: str) -> dict:
    """Several ranks: the step of ZeRO-3 vs `--sharding replicate`; evaluation on the backbone built sharded,
    gathered once vs per layer."""
    world = distributed.world_size()
    base = engine.training_ds_config(engine.read_ds_config(args.ds_config), args.batch_size, 1, 1.0, world)
    replicated, _ = engine.plan_stage(base, world, "replicate")
    trainers = {}
    for name, ds in (("ZeRO-3 engine", base), ("replicate (stage 0 on every rank)", replicated)):
        backbone, net = _models(args, model, ds if engine.zero_stage(ds) == 3 else None)
        groups = net.prompt.param_groups(args.lr_prompt, args.lr_lowrank)
        trainers[name] = engine.training_engine(net, groups, ds, 0.0, 0, 10**9)
    torch.set_num_threads(engine.cpu_threads(None, engine.count_params(backbone.model)[1]))
    train_rows, eval_rows = _rows(args, backbone)
    steps, losses = _step_rounds(args, trainers, train_rows, backbone)
    module = trainers["ZeRO-3 engine"].module
    modules = {
        "evaluator, ZeRO-3 gathered once": module,
        "evaluator, ZeRO-3 per layer": module,
        ALONE: trainers["replicate (stage 0 on every rank)"].module,
    }
    evals = _eval_rounds(args, modules, eval_rows, backbone)
    return {
        "step": {"reference": "ZeRO-3 engine", "seconds": steps, "losses": losses},
        "eval": {"reference": ALONE, "seconds": evals, "rows": len(eval_rows)},
    }


ALONE = "one rank alone: whole model, every row"


@torch.no_grad()
def _alone(module: DePTModel, rows: list[dict], backbone, args: SpeedArgs) -> None:
    """Rank 0 generates every row with the whole model (what one rank's evaluation does) while the others wait:
    the same-run reference for several ranks' evaluation."""
    if distributed.rank() == 0:
        pad = backbone.tokenizer.pad_token_id
        for start in range(0, len(rows), args.eval_batch):
            batch = collate(
                rows[start : start + args.eval_batch], pad, backbone.is_encoder_decoder, for_generation=True
            )
            module.generate(**batch, max_new_tokens=args.infer_tokens)
    distributed.barrier()


class _PlainLoop:
    """The reference step: the DePT model and AdamW (the same groups, eps), loss.backward, clip, step; no engine."""

    def __init__(self, model: DePTModel, args: SpeedArgs):
        self.module = model
        self.optimizer = torch.optim.AdamW(
            model.prompt.param_groups(args.lr_prompt, args.lr_lowrank), eps=1e-6, weight_decay=0.0
        )  # the engines' decay (AdamW's default 0.01 made the reference another computation)

    def train(self) -> None:
        self.module.train()

    def forward(self, batch: dict) -> torch.Tensor:
        return self.module(**batch).loss

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def _startup(args: SpeedArgs, model: str) -> dict:
    """Seconds from spawning `dept train` to the start of its first step (its first metrics line minus that step's
    time), the default vs --sharding zero3, interleaved."""
    variants = {"dept train (stage 0)": [], "dept train --sharding zero3": []}
    location = model_location(model)
    if Path(location).is_dir():
        variants[FLOOR] = []
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for k in distributed.LAUNCHER_VARIABLES:
        env.pop(k, None)  # the child is a process of its own
    for run in range(args.startup_runs):
        names = list(variants)
        for name in names[run % len(names) :] + names[: run % len(names)]:
            if name == FLOOR:
                variants[name].append(_floor_seconds(location, env))
                continue
            with tempfile.TemporaryDirectory(prefix="dept-speed-") as tmp:
                out = Path(tmp) / "run"
                cmd = [sys.executable, "-m", "pipeline.cli", "train", "--model", model, "--task", TASK]
                cmd += ["--output_dir", str(out), "--num_virtual_tokens", str(args.ms[0]), "--lora_rank", str(RANK_R)]
                cmd += ["--max_length", str(args.max_length), "--batch_size", str(args.batch_size), "--steps", "2"]
                cmd += ["--warmup_steps", "0", "--log_every", "1", "--max_eval_rows", "1", "--max_new_tokens", "1"]
                cmd += ["--seed", str(args.seed)] + (["--sharding", "zero3"] if "zero3" in name else [])
                tick = time.perf_counter()
                proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                first = None
                while proc.poll() is None:
                    if first is None and (out / "metrics.jsonl").exists():
                        first = time.perf_counter() - tick
                    time.sleep(0.01)
                if proc.returncode != 0 or not (out / "metrics.jsonl").exists():
                    raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.read().decode()[-2000:]}")
                if first is None:
                    first = time.perf_counter() - tick
                step = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step_s"]
                variants[name].append(first - step)
    return variants


FLOOR = "plain script: import, load tokenizer and model"
_FLOOR_SCRIPT = """
import sys, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
path = sys.argv[1]
tokenizer = AutoTokenizer.from_pretrained(path)
auto = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(path).is_encoder_decoder else AutoModelForCausalLM
model = auto.from_pretrained(path)
print(time.time(), flush=True)
"""


def _floor_seconds(location: str, env: dict) -> float:
    """Seconds from spawning the plain script to the moment it holds the tokenizer and the model: what any
    transformers job pays before its first step, whatever runs it."""
    spawned = time.time()
    done = subprocess.run(
        [sys.executable, "-c", _FLOOR_SCRIPT, location], env=env, capture_output=True, text=True, check=True
    )
    return float(done.stdout.split()[-1]) - spawned


# ----------------------------------------------------------------------------------------------- the table


def paired_ratio(seconds: dict, name: str, reference: str) -> float | None:
    """Median over rounds of (name's time / the reference's time in the same round)."""
    pairs = [a / b for a, b in zip(seconds.get(name, []), seconds.get(reference, [])) if b > 0]
    return statistics.median(pairs) if pairs else None


def speed_table(results: dict) -> str:
    """One Markdown table: per model and figure, each variant's median seconds (min-max) and paired ratio."""
    lines = [
        f"ranks: {results['world']}",
        "",
        "| model | figure | variant | median s | min-max s | ratio | vs |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, figures in results["models"].items():
        for figure, data in figures.items():
            if not isinstance(data, dict) or not data.get("seconds"):
                continue
            seconds, reference = data["seconds"], data["reference"]
            for name, values in seconds.items():
                if not values:
                    continue
                ratio = paired_ratio(seconds, name, reference)
                lines.append(
                    f"| {model} | {figure} | {name} | {statistics.median(values):.3f} | "
                    f"{min(values):.3f}-{max(values):.3f} | {'' if ratio is None else f'{ratio:.2f}'} | {reference} |"
                )
    return "\n".join(lines)


NOTES = """\
- step: forward + backward + optimizer step of one global batch (--batch_size, s = --max_length), the same batch for
  every variant in a round; `dept train (stage 0)` is engine.PlainEngine, what `dept train` runs in one process.
- eval: --eval_rows rows of the task's validation split, --infer_tokens new tokens (greedy), --eval_batch rows per
  batch; generation stops early when every row has ended, so the variants may generate slightly different numbers
  of tokens (the DePT offsets of generated tokens differ between our loop and transformers' generate).
- startup: from spawning the process to the start of its first step (imports, backbone, data, engine); the plain
  script (the floor: import torch and transformers, load the tokenizer and the model) to the moment it has them.
- several ranks: step = each rank's half of the global batch, the slowest rank's time; `replicate` is
  `--sharding replicate` (the whole model on every rank, the trainable gradients averaged in one all-reduce); eval
  is compared with rank 0 generating every row alone with the whole model (the others wait) in the same run.
- ratio: the median over rounds of the variant's time / the reference's time in the same round."""
