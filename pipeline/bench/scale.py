"""`dept bench --mode scale`: a LLaMA-architecture backbone of a chosen size built sharded under ZeRO-3; DePT steps;
per-rank bytes held, peak memory, load and step time, and the RAM headroom left."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline import distributed, engine
from pipeline.backbone import Backbone, load_backbone
from pipeline.bench.inputs import tokenized_rows
from pipeline.bench.loops import bench_engine, training_ds_config
from pipeline.bench.measure import MemorySampler, device_memory_mb, reset_peak_memory, rss_mb, summary, timed
from pipeline.bench.output import count_label, fmt, settings_record, track, write_outputs
from pipeline.bench.settings import ScaleArgs
from pipeline.data import collate
from pipeline.dept import DeptConfig, rank_for_budget
from pipeline.model import DePTModel, init_dept_prompt

log = logging.getLogger("pipeline.bench")


def run_scale(args: ScaleArgs) -> dict | None:
    """Build the backbone sharded under ZeRO-3 over the launched ranks, take a few DePT steps, report memory."""
    rank, world = engine.init_distributed(process_group=True)
    args = dataclasses.replace(args, batch_size=args.batch_size or world)  # default: one row per rank
    ds = training_ds_config(args, world)
    with MemorySampler(interval=0.05, timeline_every=0.5) as sampler:
        built = build_sharded(args, ds, sampler)
        sampler.label = "data"
        rows, info = tokenized_rows(dataclasses.replace(args, lengths="padded"), built.backbone, world)
        times, losses = take_steps(args, built, rows, sampler, rank, world)
        sampler.label = "done"
    mine = rank_record(rank, built, sampler, times, losses)
    per_rank = distributed.gather_objects([mine])
    result = None
    if rank == 0:
        result = scale_result(args, built, per_rank, ds, info, world)
        write_outputs(args.output_dir, result, scale_markdown, plot_scale)
    track(args, result)
    distributed.barrier()
    return result


@dataclass
class Sharded:
    """The backbone built sharded, its DePT module and engine, and what building them took."""

    backbone: Backbone
    shape: DeptConfig
    trainer: engine.Engine
    load_s: float
    init_s: float
    trainable: int  # elements at full size
    total: int
    held_bytes: int  # backbone bytes this rank holds
    sharding: list[dict]  # engine.sharding_report: every rank's share


def build_sharded(args: ScaleArgs, ds: dict, sampler: MemorySampler) -> Sharded:
    """The backbone built sharded with its DePT module (timed as `load`), then the engine (timed as `engine init`),
    and what each rank holds."""
    sampler.label = "load"
    tick = time.perf_counter()
    backbone = load_backbone(
        args.model, ds, engine.dtype_of(ds), args.overrides, seed=args.seed, cache_dir=os.environ.get("DEPT_CACHE")
    )
    m, s, d = args.ms[0], args.max_length, backbone.d_model
    r = min(rank_for_budget(args.pt_tokens, m, s, d), s, d)
    shape = DeptConfig(num_virtual_tokens=m, r=r, max_length=s, d_model=d)
    prompt = init_dept_prompt(shape, backbone, args.seed)
    model = DePTModel(backbone.model, prompt, backbone.is_encoder_decoder)
    load_s = time.perf_counter() - tick
    trainable, total = engine.count_params(model)
    held_bytes = sum(engine.held_numel(p) * p.element_size() for p in backbone.model.parameters())
    sampler.label = "engine init"
    tick = time.perf_counter()
    trainer = bench_engine(model, {"dept": prompt}, args, ds)
    init_s = time.perf_counter() - tick
    return Sharded(
        backbone,
        shape,
        trainer,
        load_s,
        init_s,
        trainable,
        total,
        held_bytes,
        engine.sharding_report(trainer.module.base_model),
    )


def take_steps(
    args: ScaleArgs, built: Sharded, rows: list[dict], sampler: MemorySampler, rank: int, world: int
) -> tuple[list[float], list[float]]:
    """Warm-up and timed DePT steps, each rank on its own rows of the global batch."""
    backbone, trainer = built.backbone, built.trainer
    micro = args.batch_size // world
    reset_peak_memory(trainer.device)
    times, losses = [], []
    for step in range(args.warmup + args.steps):
        first = (step * args.batch_size + rank * micro) % max(len(rows) - micro, 1)
        batch = collate(
            rows[first : first + micro], backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder, args.max_length
        )
        sampler.label = "warm-up" if step < args.warmup else "steps"  # one label a phase: the plot marks each
        seconds, loss = timed(partial(one_step, trainer, batch), trainer.device)
        if step >= args.warmup:
            times.append(seconds)
            losses.append(loss)
        if rank == 0:
            log.info("scale step %d/%d: %.2f s", step + 1, args.warmup + args.steps, seconds)
    return times, losses


def one_step(trainer: engine.Engine, batch: dict) -> float:
    loss = trainer.forward(batch)
    trainer.backward(loss)
    trainer.step()
    return float(loss.detach().float().item())


def rank_record(rank: int, built: Sharded, sampler: MemorySampler, times: list[float], losses: list[float]) -> dict:
    device = built.trainer.device
    on_accelerator = device.type != "cpu"
    return {
        "rank": rank,
        "held_param_bytes": built.held_bytes,
        "ru_maxrss_mb": rss_mb(),
        "sampled_rss_peak_mb": max(sampler.peak_rss.values()) / 2**20,
        "min_available_mb": sampler.min_available / 2**20,
        "total_ram_mb": sampler.total / 2**20,
        "times": times,
        "losses": losses,
        "timeline": sampler.timeline[-2000:],
        "alloc_peak_mb": engine.peak_memory_mb() if on_accelerator else None,
        "device_total_mb": device_memory_mb(device),
    }


def scale_result(args: ScaleArgs, built: Sharded, per_rank: list[dict], ds: dict, info: dict, world: int) -> dict:
    """Everything measured (rank 0): the slowest rank per step, memory per rank, the headroom left."""
    config = built.backbone.model.config
    on_cpu = built.trainer.device.type == "cpu"
    step_times = [max(r["times"][i] for r in per_rank) for i in range(len(per_rank[0]["times"]))]
    step = summary(step_times)
    total_ram = per_rank[0]["total_ram_mb"]
    min_avail = min(r["min_available_mb"] for r in per_rank)
    result = {
        "mode": "scale",
        "settings": settings_record(args),
        "world_size": world,
        "device": "cpu" if on_cpu else "accelerator",
        "model": args.model,
        "overrides": args.overrides,
        "d_model": built.backbone.d_model,
        "layers": getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None),
        "intermediate": getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None),
        "backbone_params": built.total - built.trainable,
        "trainable_params": built.trainable,
        "m": built.shape.num_virtual_tokens,
        "r": built.shape.r,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "dtype": str(engine.dtype_of(ds)).replace("torch.", ""),
        "load_s": built.load_s,
        "engine_init_s": built.init_s,
        "step_s": step["median"],
        "step_min_s": step["min"],
        "step_max_s": step["max"],
        "times_s": step_times,
        "tokens_per_s": args.batch_size * args.max_length / step["median"] if step["median"] else None,
        "loss_finite": all(math.isfinite(x) for r in per_rank for x in r["losses"]),
        "ranks": [{k: v for k, v in r.items() if k not in ("times", "timeline")} for r in per_rank],
        "sharding": built.sharding,
        "total_ram_mb": total_ram,
        "min_available_mb": min_avail,
        "peak_used_mb": total_ram - min_avail,
        "headroom_mb": min_avail,
        "timelines": {r["rank"]: r["timeline"] for r in per_rank},
        "lengths": info,
    }
    result["notes"] = scale_notes(result, on_cpu)
    return result


def scale_notes(result: dict, on_cpu: bool) -> list[str]:
    return [
        "held param bytes = the backbone parameters this rank holds (its ZeRO-3 partition of every parameter, "
        "elements x element size); held fraction from `engine.sharding_report` (elements held vs full size).",
        "peak RSS = the rank's peak resident set (Linux ru_maxrss), which includes gathered layers during the "
        "step and pages the allocator keeps after freeing them; sampled RSS = the highest 50 ms sample.",
        "system peak used = total RAM - the lowest available memory seen by any rank during the run "
        "(system-wide: other processes on the machine count too); headroom = that lowest available memory.",
        "load s = building the backbone already sharded (`engine.sharded_construction`, from_config) and the DePT "
        "module; engine init s = building the training engine (`engine.Engine`); step s = forward + backward + "
        "optimizer step, median over the timed steps (slowest rank per step), after the warm-up steps.",
        "To find the largest size that fits, raise --hidden / --layers / --intermediate until headroom nears 0 "
        "(keep ~1 GB spare: the OS and the launcher need some).",
    ] + (
        []
        if on_cpu
        else [
            "accelerator: alloc peak = max_memory_allocated per rank; headroom on the device = "
            "device total - alloc peak."
        ]
    )


def scale_markdown(result: dict) -> str:
    gb = 1024
    overrides = json.dumps(result["overrides"]) if result["overrides"] else ""
    lines = [
        f"# dept bench --mode scale: {result['model']} {overrides}",
        "",
        f"{count_label(result['backbone_params'])} backbone parameters (d={result['d_model']}, "
        f"{result['layers']} layers, "
        f"intermediate {result['intermediate']}), {result['dtype']}, {result['world_size']} rank(s), DePT m="
        f"{result['m']} r={result['r']} ({result['trainable_params']:,} trainable), batch {result['batch_size']} "
        f"x {result['max_length']} tokens.",
        "",
        "| rank | held params (M) | held fraction | held param GB | peak RSS GB | sampled RSS peak GB |"
        + (" alloc peak GB |" if result["device"] != "cpu" else ""),
        "|---|---|---|---|---|---|" + ("---|" if result["device"] != "cpu" else ""),
    ]
    shard = {s["rank"]: s for s in result["sharding"]}
    for r in result["ranks"]:
        sh = shard.get(r["rank"], {})
        cells = [
            str(r["rank"]),
            fmt(sh.get("held_elements", 0) / 1e6),
            fmt(sh.get("held_fraction")),
            fmt(r["held_param_bytes"] / 2**30),
            fmt(r["ru_maxrss_mb"] / gb),
            fmt(r["sampled_rss_peak_mb"] / gb),
        ]
        if result["device"] != "cpu":
            cells.append(fmt((r["alloc_peak_mb"] or 0) / gb))
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| measure | value |",
        "|---|---|",
        f"| load (build sharded) s | {fmt(result['load_s'])} |",
        f"| engine init s | {fmt(result['engine_init_s'])} |",
        f"| step s (median) | {fmt(result['step_s'])} |",
        f"| step s (min .. max) | {fmt(result['step_min_s'])} .. {fmt(result['step_max_s'])} |",
        f"| tokens/s (batch x s, padded) | {fmt(result['tokens_per_s'])} |",
        f"| total RAM GB | {fmt(result['total_ram_mb'] / gb)} |",
        f"| system peak used GB | {fmt(result['peak_used_mb'] / gb)} |",
        f"| headroom GB (total - peak used) | {fmt(result['headroom_mb'] / gb)} |",
        f"| losses finite | {result['loss_finite']} |",
        "",
        "## Notes",
        "",
    ] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot_scale(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for rank, timeline in sorted(result["timelines"].items()):
        if not timeline:
            continue
        ax.plot([t[0] for t in timeline], [t[1] / 2**30 for t in timeline], label=f"rank {rank} RSS")
        if rank == min(result["timelines"]):
            ax.plot([t[0] for t in timeline], [t[2] / 2**30 for t in timeline], "--", label="system used")
            last = None
            for t in timeline:
                if t[3] != last:
                    ax.axvline(t[0], color="grey", linewidth=0.5)
                    ax.annotate(t[3], (t[0], 0), fontsize=7, rotation=90, va="bottom", color="grey")
                    last = t[3]
    ax.axhline(result["total_ram_mb"] / 1024, color="red", linewidth=1, label="total RAM")
    ax.set(
        xlabel="s since start",
        ylabel="GB",
        title=f"{count_label(result['backbone_params'])} params on {result['world_size']} rank(s): memory over time",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
