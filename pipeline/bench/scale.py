"""`dept bench --mode scale`: a LLaMA-architecture backbone of a chosen size built sharded under ZeRO-3; DePT steps;
per-rank bytes held, peak memory, load and step time, and the RAM headroom left."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from pipeline.bench.compare import tokenized_rows
from pipeline.bench.measure import MemorySampler, rss_mb, summary, sync
from pipeline.bench.output import count_label, fmt, jsonable, track, write_outputs

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.bench")


def run_scale(settings: dict) -> dict | None:
    """Build the backbone sharded under ZeRO-3 over the launched ranks, take a few DePT steps, report memory."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from pipeline import distributed
    from pipeline.backbone import build_config, is_random, load_tokenizer
    from pipeline.data import collate
    from pipeline.dept import rank_for_budget
    from pipeline.train import (
        TrainConfig,
        build_model,
        count_params,
        load_ds_config,
        param_groups,
        sharding_report,
        warmup_then_linear_decay,
    )

    rank, world = distributed.init()
    cache = os.environ.get("DEPT_CACHE")
    if not settings["batch_size"]:
        settings["batch_size"] = world
    m, l, s = settings["ms"][0], settings["pt_tokens"], settings["max_length"]
    if is_random(settings["model"]):
        tok = load_tokenizer(settings["model"], cache)
        config = build_config(settings["model"], len(tok), settings["overrides"])
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(settings["model"], **settings["overrides"])
    d = getattr(config, "d_model", None) or config.hidden_size
    r = min(rank_for_budget(l, m, s, d), s, d)
    cfg = TrainConfig(model=settings["model"], output_dir=settings["output_dir"], ds_config=settings["ds_config"],
                      method="dept" if r else "pt", num_virtual_tokens=m, r=r, max_length=s,
                      batch_size=settings["batch_size"], lr_prompt=settings["lr_prompt"],
                      lr_lowrank=settings["lr_lowrank"], steps=10**6, warmup_steps=0, seed=settings["seed"],
                      model_overrides=settings["overrides"])
    if settings["grad_accum"] != 1:
        raise PipelineError("scale mode takes one micro-batch per step: leave --grad_accum at 1")
    ds = load_ds_config(settings["ds_config"], cfg, world)
    accel = get_accelerator()
    on_cpu = accel.device_name() == "cpu"
    with MemorySampler(interval=0.05, timeline_every=0.5) as sampler:
        sampler.label = "load"
        tick = time.perf_counter()
        model, backbone = build_model(cfg, ds)
        load_s = time.perf_counter() - tick
        trainable, total = count_params(model)
        held_bytes = sum((p.ds_tensor.numel() * p.ds_tensor.element_size()) if hasattr(p, "ds_tensor")
                         else p.numel() * p.element_size() for p in backbone.model.parameters())
        sampler.label = "engine init"
        tick = time.perf_counter()
        optimizer = torch.optim.AdamW(param_groups(model, cfg), eps=1e-6, weight_decay=0.0)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_linear_decay(0, 10**6)))
        init_s = time.perf_counter() - tick
        sharding = sharding_report(engine.module.backbone)
        sampler.label = "data"
        settings_rows = dict(settings, lengths="padded")
        rows, info = tokenized_rows(settings_rows, backbone, world)
        micro = settings["batch_size"] // world
        times, losses = [], []
        if not on_cpu:
            accel.reset_peak_memory_stats()
        for step in range(settings["warmup"] + settings["steps"]):
            sampler.label = "warm-up" if step < settings["warmup"] else "steps"
            first = (step * settings["batch_size"] + rank * micro) % max(len(rows) - micro, 1)
            batch = collate(rows[first:first + micro], backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder, s)
            batch = {k: t.to(engine.device) for k, t in batch.items()}
            sync()
            tick = time.perf_counter()
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            sync()
            elapsed = time.perf_counter() - tick
            if step >= settings["warmup"]:
                times.append(elapsed)
                losses.append(float(out.loss.detach().float().item()))
            if rank == 0:
                log.info("scale step %d/%d: %.2f s", step + 1, settings["warmup"] + settings["steps"], elapsed)
        sampler.label = "done"
    mine = {"rank": rank, "held_param_bytes": held_bytes, "ru_maxrss_mb": rss_mb(),
            "sampled_rss_peak_mb": max(sampler.peak_rss.values()) / 2**20,
            "min_available_mb": sampler.min_available / 2**20, "total_ram_mb": sampler.total / 2**20,
            "times": times, "losses": losses, "timeline": sampler.timeline[-2000:],
            "alloc_peak_mb": None if on_cpu else accel.max_memory_allocated() / 2**20,
            "device_total_mb": None if on_cpu else accel.total_memory() / 2**20}
    per_rank = distributed.gather_objects([mine])
    if rank != 0:
        track(settings, None)
        distributed.barrier()
        return None
    step_times = [max(r["times"][i] for r in per_rank) for i in range(len(times))]
    step = summary(step_times)
    total_ram = per_rank[0]["total_ram_mb"]
    min_avail = min(r["min_available_mb"] for r in per_rank)
    result = {
        "mode": "scale", "settings": jsonable(settings), "world_size": world,
        "device": "cpu" if on_cpu else "accelerator",
        "model": settings["model"], "overrides": settings["overrides"], "d_model": d,
        "layers": getattr(config, "num_hidden_layers", None) or getattr(config, "num_layers", None),
        "intermediate": getattr(config, "intermediate_size", None) or getattr(config, "d_ff", None),
        "backbone_params": total - trainable, "trainable_params": trainable, "m": m, "r": r, "max_length": s,
        "batch_size": settings["batch_size"], "dtype": str(ds_dtype_name(ds)),
        "load_s": load_s, "engine_init_s": init_s, "step_s": step["median"], "step_min_s": step["min"],
        "step_max_s": step["max"], "times_s": step_times,
        "tokens_per_s": settings["batch_size"] * s / step["median"] if step["median"] else None,
        "loss_finite": all(math.isfinite(x) for r in per_rank for x in r["losses"]),
        "ranks": [{k: v for k, v in r.items() if k not in ("times", "timeline")} for r in per_rank],
        "sharding": sharding, "total_ram_mb": total_ram, "min_available_mb": min_avail,
        "peak_used_mb": total_ram - min_avail, "headroom_mb": min_avail,
        "timelines": {r["rank"]: r["timeline"] for r in per_rank}, "lengths": info,
    }
    result["notes"] = scale_notes(result, on_cpu)
    write_outputs(settings, result, scale_markdown, plot_scale)
    track(settings, result)
    distributed.barrier()
    return result



def ds_dtype_name(ds: dict) -> str:
    from pipeline.train import ds_dtype

    return str(ds_dtype(ds)).replace("torch.", "")



def scale_notes(result: dict, on_cpu: bool) -> list[str]:
    return [
        "held param bytes = the backbone parameters this rank holds (ZeRO-3 partitions: the `ds_tensor` of every "
        "parameter, elements x element size); held fraction from `sharding_report` (ds_tensor vs ds_numel).",
        "peak RSS = the rank's peak resident set (Linux ru_maxrss), which includes gathered layers during the "
        "step and pages the allocator keeps after freeing them; sampled RSS = the highest 50 ms sample.",
        "system peak used = total RAM - the lowest available memory seen by any rank during the run "
        "(system-wide: other processes on the machine count too); headroom = that lowest available memory.",
        "load s = building the backbone already sharded (HfDeepSpeedConfig alive, from_config) and the DePT module; "
        "engine init s = deepspeed.initialize; step s = forward + backward + optimizer step, median over the timed "
        "steps (slowest rank per step), after the warm-up steps.",
        "To find the largest size that fits, raise --hidden / --layers / --intermediate until headroom nears 0 "
        "(keep ~1 GB spare: the OS and the launcher need some).",
    ] + ([] if on_cpu else ["accelerator: alloc peak = max_memory_allocated per rank; headroom on the device = "
                             "device total - alloc peak."])



def scale_markdown(result: dict) -> str:
    gb = 1024
    overrides = json.dumps(result["overrides"]) if result["overrides"] else ""
    lines = [f"# dept bench --mode scale: {result['model']} {overrides}",
             "", f"{count_label(result['backbone_params'])} backbone parameters (d={result['d_model']}, "
             f"{result['layers']} layers, "
             f"intermediate {result['intermediate']}), {result['dtype']}, {result['world_size']} rank(s), DePT m="
             f"{result['m']} r={result['r']} ({result['trainable_params']:,} trainable), batch {result['batch_size']} "
             f"x {result['max_length']} tokens.", "",
             "| rank | held params (M) | held fraction | held param GB | peak RSS GB | sampled RSS peak GB |"
             + (" alloc peak GB |" if result["device"] != "cpu" else ""),
             "|---|---|---|---|---|---|" + ("---|" if result["device"] != "cpu" else "")]
    shard = {s["rank"]: s for s in result["sharding"]}
    for r in result["ranks"]:
        sh = shard.get(r["rank"], {})
        cells = [str(r["rank"]), fmt(sh.get("held_elements", 0) / 1e6), fmt(sh.get("held_fraction")),
                 fmt(r["held_param_bytes"] / 2**30), fmt(r["ru_maxrss_mb"] / gb), fmt(r["sampled_rss_peak_mb"] / gb)]
        if result["device"] != "cpu":
            cells.append(fmt((r["alloc_peak_mb"] or 0) / gb))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| measure | value |", "|---|---|",
              f"| load (build sharded) s | {fmt(result['load_s'])} |",
              f"| engine init s | {fmt(result['engine_init_s'])} |",
              f"| step s (median) | {fmt(result['step_s'])} |",
              f"| step s (min .. max) | {fmt(result['step_min_s'])} .. {fmt(result['step_max_s'])} |",
              f"| tokens/s (batch x s, padded) | {fmt(result['tokens_per_s'])} |",
              f"| total RAM GB | {fmt(result['total_ram_mb'] / gb)} |",
              f"| system peak used GB | {fmt(result['peak_used_mb'] / gb)} |",
              f"| headroom GB (total - peak used) | {fmt(result['headroom_mb'] / gb)} |",
              f"| losses finite | {result['loss_finite']} |",
              "", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
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
    ax.set(xlabel="s since start", ylabel="GB", title=f"{count_label(result['backbone_params'])} params on "
           f"{result['world_size']} rank(s): memory over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
