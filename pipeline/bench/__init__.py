"""`dept bench`: what DePT's shorter prompt buys in step time, memory and inference, measured on the real step.

A client of the library: backbones from `pipeline.backbone`, the DePT module from `pipeline.model`/`pipeline.dept`,
DeepSpeed only through `pipeline.engine` (this package imports no DeepSpeed module, reads no attribute of it), data from
`pipeline.data`/`pipeline.tasks`, MLflow through `pipeline.tracking`.

Honest timing on a noisy machine: every configuration runs inside one process on one set of weights, and the
steps are interleaved round-robin (round i runs one step of every configuration, starting at a rotating position)
so that a slow spell of the machine hits all configurations alike; each round uses the next batch of the
epoch order, the same batch for every configuration. Medians are reported with min-max, and ratios are computed
per round from steps taken side by side (then the median of those paired ratios).

Modules, one concept each:
  settings        the typed flags per mode (CompareArgs, ScaleArgs), presets     (no torch: the CLI reads it)
  variants        the configurations (rows) of a compare table                  (no torch)
  inputs          task rows tokenized to s, and each configuration's batch tensors
  loops           the prompt modules and the three ways a row steps: engine, plain PyTorch, PEFT
  compare         the compare run: set up, timed rounds, memory profile, inference, gather
  compare_report  its table, the paired ratios, notes, Markdown and plot        (no torch)
  scale           the scale run and its report
  speed           the speed run (#24): step, evaluation, start-up next to plain PyTorch, and its table
  measure         timing and memory helpers
  output          files, number formatting, MLflow
Importing `pipeline.bench` imports no torch; the run modules are imported when the command runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from pipeline.bench.settings import PRESETS, CompareArgs, ScaleArgs, bench_args, with_model_overrides
from pipeline.options import describe, flat_fields

ABOUT = """\
Benchmark DePT against prompt tuning at equal budget (compare), or find the largest backbone that fits (scale).

  compare (default)  one backbone geometry; PT with l tokens and DePT at the same budget for every m in --ms
                     (r from rank_for_budget), each through the real training step (DePT module + backbone +
                     DeepSpeed ZeRO-3 engine: forward, backward, optimizer step), next to reference rows:
                       bare    the backbone alone on an input of the same total length (L + m): the floor for any
                               prompt method, through the same engine;
                       eager   the bare backbone and our PT module without the engine (plain PyTorch loop);
                       peft    PEFT's PromptTuning with l tokens, encoder only (num_transformer_submodules=1),
                               without the engine, on a copy of the same weights and the same batches;
                       padded  PT with l tokens, every input padded to s (the authors' setting), when the main
                               rows use dynamic padding on real lengths.
  scale              a LLaMA-architecture backbone of a chosen size built directly sharded under ZeRO-3 over the
                     launched ranks; a few DePT steps; per-rank bytes held, peak memory, load time, step time and
                     the RAM headroom left.
  speed              the pipeline's step (`dept train` in one process), evaluation by generation and start-up next
                     to a plain PyTorch loop, a plain `generate` loop and ZeRO-3 (#24); several models at once
                     with a comma-separated model list; under ./launch.sh: evaluation gathered once vs per layer.

Writes bench.md (table + notes), bench.json (every number) and bench.png to --output_dir, prints the table, and
logs all of it to MLflow with --mlflow_uri (one run per invocation). Under ./launch.sh every rank runs the
command; rank 0 writes."""


def bench_flags() -> dict[str, type]:
    """The flags of `dept bench` and their types (from CompareArgs; ScaleArgs has the same flags)."""
    return {flag: tp for flag, (_, _, tp) in flat_fields(CompareArgs).items()}


def bench_help() -> str:
    """`dept bench --help`: what it does, every flag (from CompareArgs), scale mode's defaults (from ScaleArgs)
    and the presets."""
    lines = ["usage: dept bench [--flag value ...]        (./launch.sh bench ... on several ranks)", "", ABOUT, ""]
    lines += describe(CompareArgs, "flags")
    lines += ["", "scale mode's defaults (--mode scale): " + _scale_defaults()]
    lines += ["", "presets (--preset NAME; explicit flags override their values):"]
    for name, values in PRESETS.items():
        shown = " ".join(f"{key}={_shown(value)}" for key, value in values.items())
        lines.append(f"  {name:<16} {shown}")
    return "\n".join(lines)


def _scale_defaults() -> str:
    """The flags whose default differs in scale mode, as `name=value` (ScaleArgs vs CompareArgs)."""
    compare = {f.name: _default(f) for f in dataclasses.fields(CompareArgs)}
    scale = {f.name: _default(f) for f in dataclasses.fields(ScaleArgs)}
    return " ".join(f"{name}={_shown(value) or 'none'}" for name, value in scale.items() if value != compare[name])


def _default(spec: dataclasses.Field):
    return spec.default_factory() if spec.default is dataclasses.MISSING else spec.default


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def bench(**flags) -> dict | None:
    """Run `dept bench` with these flags (strings as on the command line, or Python values); returns the result
    on rank 0 (what bench.json holds), None on the other ranks."""
    args = with_model_overrides(bench_args(flags))
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # torch.profiler's per-start/stop lines on stderr
    _quiet_libraries()
    if args.mode == "scale":
        from pipeline.bench.scale import run_scale

        return run_scale(args)
    if args.mode == "speed":
        from pipeline.bench.speed import run_speed

        return run_speed(args)
    from pipeline.bench.compare import run_compare

    return run_compare(args)


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for noisy in ("DeepSpeed", "torch.distributed", "datasets", "peft", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
