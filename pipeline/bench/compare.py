"""`dept bench` compare mode: PT and DePT at equal budget plus reference rows, interleaved on one sharded backbone.

Reads top to bottom: set up (backbones, rows of the table, data, the loops) -> timed rounds -> one profiled step
per row -> inference timings -> gather the ranks' numbers -> report (rank 0) and MLflow.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from functools import partial

import torch

from pipeline import distributed, engine
from pipeline.backbone import Backbone, load_backbone
from pipeline.bench.compare_report import compare_markdown, compare_report, plot_compare
from pipeline.bench.inputs import Batches, tokenized_rows
from pipeline.bench.loops import (
    EngineLoop,
    PlainLoop,
    PromptSwitch,
    attach_lora,
    bench_engine,
    engine_prompts,
    exact_generation_length,
    plain_loops,
    training_ds_config,
)
from pipeline.bench.measure import MemorySampler, measured, rss_mb, tensor_peak
from pipeline.bench.output import track, write_outputs
from pipeline.bench.settings import CompareArgs
from pipeline.bench.variants import Variant, plan_variants

log = logging.getLogger("pipeline.bench")


@dataclass
class Bench:
    """A compare run, set up: its rows, the loops that run them, the data, and facts for the report."""

    args: CompareArgs
    variants: list[Variant]
    loops: dict[str, EngineLoop | PlainLoop]  # by Variant.loop
    batches: Batches
    rank: int
    world: int
    load_s: float
    d_model: int
    dtype: str
    is_encoder_decoder: bool
    length_info: dict

    @property
    def device(self) -> torch.device:
        return self.batches.device

    def rotation(self, index: int) -> list[Variant]:
        """Every row once, starting at a position that moves with `index` (no row always runs first)."""
        n = len(self.variants)
        return [self.variants[(index + j) % n] for j in range(n)]


def run_compare(args: CompareArgs) -> dict | None:
    rank, world = engine.init_distributed(process_group=True)
    ds = training_ds_config(args, world)
    with MemorySampler() as sampler:
        bench = set_up(args, ds, rank, world)
        rounds = args.warmup + args.steps
        for index in range(rounds):
            timed_round(bench, index, sampler, timed=index >= args.warmup)
            if rank == 0:
                log.info("round %d/%d done%s", index + 1, rounds, "" if index >= args.warmup else " (warm-up)")
        if args.memory_profile:
            profile_memory(bench, sampler)
        if args.infer_repeats:
            time_inference(bench, sampler)
    per_rank = distributed.gather_objects([rank_measurements(bench, sampler)])
    result = None
    if rank == 0:
        result = compare_report(bench, per_rank, sampler.total, engine.on_cpu())
        write_outputs(args.output_dir, result, compare_markdown, plot_compare)
    track(args, result)
    distributed.barrier()
    return result


def set_up(args: CompareArgs, ds: dict, rank: int, world: int) -> Bench:
    """Backbones, the table's rows, the data and one loop per kind of row."""
    tick = time.perf_counter()
    backbone, plain = load_backbones(args, ds)
    load_s = time.perf_counter() - tick
    variants = plan_variants(args, backbone.d_model)
    if "lora" in args.refs:
        variants.append(attach_lora(args, backbone))
    rows, length_info = tokenized_rows(args, backbone, world)
    prompts = engine_prompts(args, variants, backbone)
    model = PromptSwitch(backbone.model, prompts, backbone.is_encoder_decoder)
    trainer = bench_engine(model, prompts, args, ds)
    loops = {"engine": EngineLoop(trainer, synced=world > 1)}
    if plain is not None:
        loops.update(plain_loops(args, plain, backbone, trainer.device))
    for net in (backbone, plain):
        if net is not None and args.infer_tokens:
            exact_generation_length(net.model, args.infer_tokens)
    batches = Batches(
        rows, args, rank, world, backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder, trainer.device
    )
    if rank == 0:
        log.info(
            "bench: %d configurations, %d warm-up + %d timed rounds, lengths=%s (%s)",
            len(variants),
            args.warmup,
            args.steps,
            args.lengths,
            length_info["source"],
        )
    return Bench(
        args,
        variants,
        loops,
        batches,
        rank,
        world,
        load_s,
        backbone.d_model,
        str(engine.dtype_of(ds)).replace("torch.", ""),
        backbone.is_encoder_decoder,
        length_info,
    )


def load_backbones(args: CompareArgs, ds: dict) -> tuple[Backbone, Backbone | None]:
    """The sharded backbone, and an unsharded one of the same geometry when a no-engine row is asked for.

    The plain one is built first: building without a DeepSpeed config ends transformers' ZeRO-3 hook, which the
    sharded backbone needs alive afterwards (generation consults it)."""
    cache, dtype = os.environ.get("DEPT_CACHE"), engine.dtype_of(ds)
    plain = None
    if {"eager", "peft"} & set(args.refs):
        plain = load_backbone(args.model, None, dtype, args.overrides, seed=args.seed, cache_dir=cache)
    return load_backbone(args.model, ds, dtype, args.overrides, seed=args.seed, cache_dir=cache), plain


def timed_round(bench: Bench, index: int, sampler: MemorySampler, timed: bool) -> None:
    """One step of every row on the same batch (the next of the epoch order), in rotated order."""
    parts = bench.batches.parts(index)
    for v in bench.rotation(index):
        batches, real, width = bench.batches.tensors(parts, v)
        loop = bench.loops[v.loop]
        seconds, loss = measured(partial(loop.step, v.module, batches), sampler, v.key, bench.device)
        if timed:
            v.record(seconds, float(loss.detach().float().item()), real, width)


def profile_memory(bench: Bench, sampler: MemorySampler) -> None:
    """One extra, untimed step per row on the first batch, for its tensor peak."""
    parts = bench.batches.parts(0)
    for v in bench.variants:
        batches, _, _ = bench.batches.tensors(parts, v)
        loop = bench.loops[v.loop]
        sampler.label = v.key
        v.step_peak_mb, v.alloc_peak_mb = tensor_peak(partial(loop.step, v.module, batches), bench.device)
        sampler.label = "between"


def time_inference(bench: Bench, sampler: MemorySampler) -> None:
    """One evaluation batch (this rank's first micro-batch) per row and repeat, interleaved like the rounds."""
    args = bench.args
    for loop in bench.loops.values():
        loop.train(False)
    parts = bench.batches.parts(0)[:1]
    for repeat in range(args.infer_repeats):
        for v in bench.rotation(repeat):
            (batch,), _, _ = bench.batches.tensors(parts, v, generation=args.infer_tokens > 0)
            loop = bench.loops[v.loop]
            seconds, _ = measured(partial(loop.infer, v.module, batch, args.infer_tokens), sampler, v.key, bench.device)
            v.infer.append(seconds)
    for loop in bench.loops.values():
        loop.train(True)


def rank_measurements(bench: Bench, sampler: MemorySampler) -> dict:
    """This rank's numbers, for rank 0 to combine (a step lasts as long as its slowest rank)."""
    variants = bench.variants
    for v in variants:
        v.rss_peak_mb = sampler.peak_rss.get(v.key, 0) / 2**20
    return {
        "rank": bench.rank,
        "times": {v.key: v.times for v in variants},
        "infer": {v.key: v.infer for v in variants},
        "step_peak": {v.key: v.step_peak_mb for v in variants},
        "rss_peak": {v.key: v.rss_peak_mb for v in variants},
        "losses": {v.key: v.losses for v in variants},
        "real": {v.key: v.real_tokens for v in variants},
        "ru_maxrss_mb": rss_mb(),
        "min_available_mb": sampler.min_available / 2**20,
    }
