"""`dept bench` settings: one typed class per mode (`CompareArgs`, `ScaleArgs`, `SpeedArgs`), the presets, and how they combine.

`dept bench` takes one set of flags (those of `CompareArgs`, which `--help` lists); `ScaleArgs` is the same flags
with scale mode's defaults (#23: one class per mode instead of defaults patched in). `--mode` (or a preset's)
picks the class; explicit flags win over a preset's values, a preset's over the class's defaults. Everything is
checked by `pipeline.options` (types, choices, minimums: one-line errors naming the flag) and by `__post_init__`
(rules across flags). Nothing here imports torch: the CLI reads these names for `--help`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Literal

from pipeline.errors import PipelineError
from pipeline.options import coerce, field_types, from_flags, option
from pipeline.resources import ds_config_path

log = logging.getLogger("pipeline.bench")
REPO = Path(__file__).resolve().parents[2]

MODES = ("compare", "scale", "speed")
LENGTHS = ("padded", "rte", "boolq")
TASK_OF_LENGTHS = {"padded": "rte", "rte": "rte", "boolq": "boolq"}  # `padded` takes RTE rows to s (or synthetic)
REFS = ("bare", "eager", "peft", "padded", "lora")
REF_WORDS = REFS + ("all", "none")
DATA_TOKENIZER = "data-32k"  # a 32k SentencePiece trained on the task data (T5's own is not reachable offline)
RANDOM_PREFIX = "random:"  # pipeline.backbone's; repeated here so that --help needs no torch

# Batch 32 as 4 micro-batches of 8 (8 of 4 for t5-large): the activations of 32 x 356 tokens at once would take
# ~18 GB for T5-base in fp32 (scaled from T5-small's measured step peak), too close to a 24 GB machine's RAM.
PAPER = dict(
    mode="compare",
    model="random:t5-base",
    ms=[0, 20, 40, 60, 80, 100],
    pt_tokens=100,
    max_length=256,
    batch_size=32,
    grad_accum=4,
    steps=5,
    warmup=1,
    lengths="padded",
)
PRESETS: dict[str, dict] = {
    # The paper's efficiency setting: T5-base geometry, l = 100, s = 256, every input padded to s, batch 32.
    "paper": dict(PAPER),
    # Same budget, dynamic padding on real RTE / BoolQ lengths, with the padded PT row next to it.
    "paper-rte": dict(PAPER, lengths="rte", tokenizer=DATA_TOKENIZER),
    "paper-boolq": dict(PAPER, lengths="boolq", tokenizer=DATA_TOKENIZER),
    # "DePT's advantage grows with model size": the same table on the other T5 geometries.
    "paper-t5-small": dict(PAPER, model="random:t5-small"),
    "paper-t5-large": dict(PAPER, model="random:t5-large", grad_accum=8),
    # Scale mode (run under ./launch.sh; bf16 on CPU). `scale-dev` is the small geometry for trying it out.
    "scale-dev": dict(mode="scale", model="random:llama-7b", hidden=256, layers=4, intermediate=688),
    "scale-llama-1b": dict(mode="scale", model="random:llama-1b"),
    "scale-llama-3b": dict(mode="scale", model="random:llama-7b", hidden=3200, layers=26, intermediate=8640),
    "scale-llama-7b": dict(mode="scale", model="random:llama-7b"),
}
PRESET_NAMES = tuple(PRESETS)


@dataclass
class CompareArgs:
    """The flags of `dept bench`, with compare mode's defaults (scale mode's: `ScaleArgs`, named in the help)."""

    preset: Literal[PRESET_NAMES] | None = option(None, "a named setting (below); explicit flags override its values")
    mode: Literal[MODES] = option(
        "compare",
        "compare: PT vs DePT at equal budget, with reference rows; scale: the "
        "largest LLaMA backbone that fits, sharded over the launched ranks; speed: the pipeline's step, "
        "evaluation and start-up next to plain PyTorch loops (#24)",
    )
    model: str = option(
        "random:t5-base",
        "random:<preset> (random weights from the preset's geometry: t5-base, "
        "t5-small, t5-large, tiny-t5, llama-7b, ...) or a local model directory; scale: "
        "random:llama-7b",
    )
    ms: list[int] = option(
        help="prompt lengths m, comma-separated (default 0,20,40,60,80,100; scale: 60, and only "
        "the first is used); each gets r = rank_for_budget(l, m, s, d), m = l is vanilla PT",
        default_factory=lambda: [0, 20, 40, 60, 80, 100],
    )
    pt_tokens: int = option(
        100,
        "l, the vanilla prompt length that sets the budget (not --l: the DeepSpeed "
        "launcher would take it for --launcher)",
        minimum=1,
    )
    max_length: int = option(256, "s, the longest input and the rows of A (scale: 64)", minimum=1)
    batch_size: int = option(
        8, "global batch over all ranks (scale: 0 = one row per rank; paper presets: 32)", minimum=0
    )
    grad_accum: int = option(
        1,
        "micro-batches per step and rank, then one optimizer step (paper presets: 4, "
        "t5-large 8, so that batch 32 fits in 24 GB of RAM; scale: 1 only)",
        minimum=1,
    )
    steps: int = option(5, "timed steps (rounds) per configuration (scale: 3)", minimum=1)
    warmup: int = option(1, "untimed rounds before them", minimum=0)
    lengths: Literal[LENGTHS] = option(
        "padded",
        "padded: every input padded to s (the paper's setting); rte, boolq: "
        "the shipped task's real lengths, each batch padded to its longest input "
        "(an epoch-time estimate is reported)",
    )
    refs: list[Literal[REF_WORDS]] = option(
        help="reference rows, comma-separated from bare, eager, peft, padded, lora, or all / none (default all; scale: none)",
        default_factory=lambda: list(REFS),
    )
    infer_tokens: int = option(
        2,
        "inference = one evaluation batch with exactly this many greedy tokens; 0 = one "
        "eval-mode forward pass instead (scale: 0)",
        minimum=0,
    )
    infer_repeats: int = option(
        3, "inference timings per configuration, interleaved; 0 skips inference (scale: 0)", minimum=0
    )
    group_by_length: bool = option(
        False,
        "batch rows of similar length together (the epoch order of `dept train "
        "--group_by_length`), so that dynamic padding wastes little",
    )
    memory_profile: bool = option(
        True,
        "one extra untimed step per configuration measures its tensor peak "
        "(CPU: torch.profiler memory events; GPU: the allocator's peak)",
    )
    tokenizer: str = option(
        "",
        "tokenizer whose token counts set the lengths (hub name or directory; its ids are "
        f"folded into the backbone's vocabulary), or {DATA_TOKENIZER} (a 32k SentencePiece "
        "trained on the task data); default: the backbone's own",
    )
    data_dir: str = option(
        "", "folder with <task>/<split>.jsonl (default $DEPT_DATA_DIR, else ../shared/data next to the repository)"
    )
    hidden: int | None = option(
        None,
        "backbone width (LLaMA hidden_size, T5 d_model); heads follow at 128 (LLaMA) "
        "or 64 (T5) per head unless --heads is given",
        minimum=1,
    )
    layers: int | None = option(None, "layer count (LLaMA num_hidden_layers; T5 encoder and decoder layers)", minimum=1)
    intermediate: int | None = option(None, "feed-forward width (LLaMA intermediate_size, T5 d_ff)", minimum=1)
    heads: int | None = option(None, "attention heads (LLaMA also sets num_key_value_heads)", minimum=1)
    overrides: dict = option(help="any other config fields, e.g. '{\"num_key_value_heads\": 8}'", default_factory=dict)
    output_dir: str = option("bench_out", "where bench.md, bench.json and bench.png go")
    ds_config: str = option("zero3_cpu", "DeepSpeed config: a shipped name or a JSON path (scale: zero3_cpu_bf16)")
    lr_prompt: float = option(0.3, "learning rate of the prompts (timing does not depend on it)", minimum=0.0)
    lr_lowrank: float = option(1e-4, "learning rate of A and B", minimum=0.0)
    eval_rows: int = option(100, "speed: rows generated per evaluation", minimum=1)
    eval_batch: int = option(32, "speed: rows per generation batch", minimum=1)
    startup_runs: int = option(
        3, "speed: `dept train` processes spawned per variant to time the start-up (0: none)", minimum=0
    )
    mlflow_uri: str = option("", "MLflow tracking URI such as sqlite:///mlflow.db; empty: no tracking")
    experiment: str = option("dept-bench", "MLflow experiment name")
    seed: int = option(42, "seed of the random backbone, the prompts and the batch order", minimum=0)

    def __post_init__(self):
        self.ms = list(dict.fromkeys(self.ms))
        if not self.ms:
            raise PipelineError("--ms is empty: give at least one prompt length")
        bad = [m for m in self.ms if m < 0 or m > self.pt_tokens]
        if bad:
            raise PipelineError(f"every m in --ms must lie in 0..l (l = pt_tokens = {self.pt_tokens}); got {bad}")
        self.refs = _expand_refs(self.refs)
        if "peft" in self.refs and importlib.util.find_spec("peft") is None:
            raise PipelineError(
                "the peft reference row needs the peft package: pip install peft, or leave peft out of --refs"
            )
        if self.mode == "compare" and self.batch_size < 1:
            raise PipelineError("--batch_size must be at least 1 in compare mode")
        if self.mode == "scale":
            self.ms = self.ms[:1]
            if self.grad_accum != 1:
                raise PipelineError("scale mode takes one micro-batch per step: leave --grad_accum at 1")
        resized = [f"--{name}" for name in ("hidden", "layers", "intermediate", "heads") if getattr(self, name)]
        if resized and not self.model.startswith(RANDOM_PREFIX):
            verb = "needs" if len(resized) == 1 else "need"
            raise PipelineError(
                f"{'/'.join(resized)} {verb} a random:<preset> model; use --overrides with the "
                "config's own field names for a model directory"
            )
        ds_config_path(self.ds_config)  # a missing file is refused now, not after the backbone is built


def _expand_refs(refs: list[str]) -> list[str]:
    """`all` and `none` stand alone; the rest keep their order, once each."""
    words = list(dict.fromkeys(refs))
    if len(words) > 1 and ({"all", "none"} & set(words)):
        raise PipelineError(f"--refs: all and none stand alone, got {','.join(words)}")
    if words == ["all"]:
        return list(REFS)
    return [] if words == ["none"] else words


def _scale_default(name: str, default=MISSING, default_factory=MISSING):
    """CompareArgs' flag `name` (its help and minimum) with scale mode's default."""
    meta = CompareArgs.__dataclass_fields__[name].metadata
    return option(default, meta["help"], minimum=meta["minimum"], default_factory=default_factory)


@dataclass
class ScaleArgs(CompareArgs):
    """The flags of `dept bench --mode scale`: CompareArgs' flags with the defaults of the ZeRO-3 scale test."""

    mode: Literal[MODES] = _scale_default("mode", "scale")
    model: str = _scale_default("model", "random:llama-7b")
    ms: list[int] = _scale_default("ms", default_factory=lambda: [60])
    max_length: int = _scale_default("max_length", 64)
    batch_size: int = _scale_default("batch_size", 0)
    steps: int = _scale_default("steps", 3)
    refs: list[Literal[REF_WORDS]] = _scale_default("refs", default_factory=list)
    infer_tokens: int = _scale_default("infer_tokens", 0)
    infer_repeats: int = _scale_default("infer_repeats", 0)
    ds_config: str = _scale_default("ds_config", "zero3_cpu_bf16")


@dataclass
class SpeedArgs(CompareArgs):
    """The flags of `dept bench --mode speed` (#24): the quickstart's geometry (stories260K, m = 12, s = 96, batch
    16) and 8 new tokens for evaluation; `--model` may list several models, comma-separated."""

    mode: Literal[MODES] = _scale_default("mode", "speed")
    model: str = _scale_default("model", "stories260K")
    ms: list[int] = _scale_default("ms", default_factory=lambda: [12])
    pt_tokens: int = _scale_default("pt_tokens", 12)
    max_length: int = _scale_default("max_length", 96)
    batch_size: int = _scale_default("batch_size", 16)
    steps: int = _scale_default("steps", 10)
    warmup: int = _scale_default("warmup", 2)
    refs: list[Literal[REF_WORDS]] = _scale_default("refs", default_factory=list)
    infer_tokens: int = _scale_default("infer_tokens", 8)
    ds_config: str = _scale_default("ds_config", "zero3_cpu")


BenchArgs = CompareArgs | ScaleArgs  # what the modules both modes share (inputs, loops, output) accept
MODE_ARGS = {"compare": CompareArgs, "scale": ScaleArgs, "speed": SpeedArgs}


def bench_args(flags: dict) -> CompareArgs | ScaleArgs:
    """The mode's settings from `dept bench` flags (strings from the command line, or Python values): explicit
    flags win over the preset's values, the preset's over the mode's defaults."""
    types = field_types(CompareArgs)
    preset = coerce(flags.get("preset") or None, types["preset"], "--preset")
    chosen = {**PRESETS.get(preset, {}), **flags, "preset": preset}
    mode = coerce(chosen.get("mode", "compare"), types["mode"], "--mode")
    defaults = {"refs": _default_refs()} if mode == "compare" else {}
    return from_flags(MODE_ARGS[mode], {**defaults, **chosen, "mode": mode}, "bench")


def _default_refs() -> list[str]:
    """Every reference row; without the peft package, all but PEFT's (said once, not refused: it is optional)."""
    if importlib.util.find_spec("peft") is not None:
        return list(REFS)
    log.warning("peft is not installed: the PEFT reference row is left out (pip install peft to include it)")
    return [ref for ref in REFS if ref != "peft"]


def with_model_overrides(args: BenchArgs) -> BenchArgs:
    """`args` with --hidden/--layers/--intermediate/--heads folded into `overrides` as the architecture's config
    field names (explicit --overrides entries win). Reads the backbone presets, so torch is imported."""
    from pipeline.backbone import PRESETS as GEOMETRIES

    geometry = GEOMETRIES.get(args.model[len(RANDOM_PREFIX) :]) if args.model.startswith(RANDOM_PREFIX) else None
    arch = geometry["arch"] if geometry else None
    out = dict(args.overrides)
    if arch == "llama":
        _set_llama(out, args)
    elif arch == "t5":
        _set_t5(out, args)
    return dataclasses.replace(args, overrides=out)


def _set_llama(out: dict, args: BenchArgs) -> None:
    for key, value in (
        ("hidden_size", args.hidden),
        ("num_hidden_layers", args.layers),
        ("intermediate_size", args.intermediate),
    ):
        if value:
            out.setdefault(key, value)
    heads = args.heads or (max(1, args.hidden // 128) if args.hidden else None)
    if heads:
        out.setdefault("num_attention_heads", heads)
        out.setdefault("num_key_value_heads", heads)


def _set_t5(out: dict, args: BenchArgs) -> None:
    for key, value in (
        ("d_model", args.hidden),
        ("num_layers", args.layers),
        ("num_decoder_layers", args.layers),
        ("d_ff", args.intermediate),
    ):
        if value:
            out.setdefault(key, value)
    heads = args.heads or (max(1, args.hidden // 64) if args.hidden else None)
    if heads:
        out.setdefault("num_heads", heads)
        out.setdefault("d_kv", int(out.get("d_model", args.hidden or 64 * heads)) // heads)


def data_folder(data_dir: str) -> str | None:
    """--data_dir, else $DEPT_DATA_DIR, else ../shared/data beside the repository, else None (the hub)."""
    if data_dir:
        return data_dir
    if os.environ.get("DEPT_DATA_DIR"):
        return os.environ["DEPT_DATA_DIR"]
    shipped = REPO.parent / "shared" / "data"
    return str(shipped) if shipped.is_dir() else None
