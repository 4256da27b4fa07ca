"""`dept bench`: what DePT's shorter prompt buys in step time, memory and inference, measured on the real step.

Two modes:

  compare (default)  one backbone geometry; PT with `l` tokens and DePT at the same budget for every m in `ms`
                     (r from `rank_for_budget`), each through the real training step (DePTPrompt + backbone +
                     DeepSpeed ZeRO-3 engine: forward, backward, optimizer step), next to reference rows:
                       bare    the backbone alone on an input of the same total length (L + m): the floor for any
                               prompt method, run through the same engine (one trainable vector [d] added to every
                               input embedding so that the backward pass reaches the input, as a prompt's does);
                       eager   the bare backbone and our PT module without DeepSpeed (plain PyTorch loop);
                       peft    PEFT's PromptTuning with `l` tokens, num_transformer_submodules=1 (encoder only:
                               PEFT's seq2seq default also prompts the decoder, which doubles the budget), without
                               DeepSpeed, on a copy of the same backbone weights and the same batches;
                       padded  PT with `l` tokens with every input padded to s (the authors' setting), when the main
                               rows use dynamic padding on real lengths.
  scale              a LLaMA-architecture backbone of a chosen size built directly sharded under ZeRO-3 over the
                     launched ranks; a few DePT steps; per-rank bytes held, peak memory, load time, step time and
                     the RAM headroom left.

Honest timing on a noisy machine: every configuration runs inside one process on one set of weights, and the
steps are interleaved round-robin (round i runs one step of every configuration, starting at a rotating position)
so that a slow spell of the machine hits all configurations alike; each round uses the next batch of the
epoch order, the same batch for every configuration. Medians are reported with min-max, and ratios are computed
per round from steps taken side by side (then the median of those paired ratios).

This module imports only the standard library at import time (the CLI imports it for `--help`); torch, DeepSpeed,
PEFT, matplotlib and MLflow are imported when the command runs.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import resource
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
DS_CONFIGS = REPO / "ds_configs"
REFS = ("bare", "eager", "peft", "padded")
LENGTHS = {"padded": "rte", "rte": "rte", "boolq": "boolq"}  # `padded` takes RTE rows (or synthetic ones) to s
FILLER_ID = 5  # token id of the extra inputs of bare rows (content does not change the work)

# Values a preset sets; explicit flags win over a preset, a preset over the mode's defaults.
COMPARE_DEFAULTS = dict(model="random:t5-base", ms="0,20,40,60,80,100", pt_tokens=100, max_length=256, batch_size=8,
                        grad_accum=1, steps=5, warmup=1, lengths="padded", refs="bare,eager,peft,padded",
                        infer_tokens=2, infer_repeats=3, ds_config=str(DS_CONFIGS / "zero3_cpu.json"))
SCALE_DEFAULTS = dict(model="random:llama-7b", ms="60", pt_tokens=100, max_length=64, batch_size=0, grad_accum=1,
                      steps=3, warmup=1, lengths="padded", refs="", infer_tokens=0, infer_repeats=0,
                      ds_config=str(DS_CONFIGS / "zero3_cpu_bf16.json"))
# Batch 32 as 4 micro-batches of 8 (8 of 4 for t5-large): the activations of 32 x 356 tokens at once would take
# ~18 GB for T5-base in fp32 (scaled from T5-small's measured step peak), too close to a 24 GB machine's RAM.
PAPER = dict(mode="compare", model="random:t5-base", ms="0,20,40,60,80,100", pt_tokens=100, max_length=256,
             batch_size=32, grad_accum=4, steps=5, warmup=1, lengths="padded")
PRESETS: dict[str, dict] = {
    # The paper's efficiency setting: T5-base geometry, l = 100, s = 256, every input padded to s, batch 32.
    "paper": dict(PAPER),
    # Same budget, dynamic padding on real RTE / BoolQ lengths, with the padded PT row next to it.
    "paper-rte": dict(PAPER, lengths="rte"),
    "paper-boolq": dict(PAPER, lengths="boolq"),
    # "DePT's advantage grows with model size": the same table on the other T5 geometries.
    "paper-t5-small": dict(PAPER, model="random:t5-small"),
    "paper-t5-large": dict(PAPER, model="random:t5-large", grad_accum=8),
    # Scale mode (run under ./launch.sh; bf16 on CPU). `scale-dev` is the small geometry for trying it out.
    "scale-dev": dict(mode="scale", model="random:llama-7b", hidden=256, layers=4, intermediate=688),
    "scale-llama-1b": dict(mode="scale", model="random:llama-1b"),
    "scale-llama-3b": dict(mode="scale", model="random:llama-7b", hidden=3200, layers=26, intermediate=8640),
    "scale-llama-7b": dict(mode="scale", model="random:llama-7b"),
}


def bench(
    preset: str = "",
    mode: str | None = None,
    model: str | None = None,
    ms: str | int | list | tuple | None = None,
    pt_tokens: int | None = None,
    max_length: int | None = None,
    batch_size: int | None = None,
    grad_accum: int | None = None,
    steps: int | None = None,
    warmup: int | None = None,
    lengths: str | None = None,
    refs: str | list | tuple | None = None,
    infer_tokens: int | None = None,
    infer_repeats: int | None = None,
    memory_profile: bool = True,
    tokenizer: str = "",
    data_dir: str = "",
    hidden: int | None = None,
    layers: int | None = None,
    intermediate: int | None = None,
    heads: int | None = None,
    overrides: dict | str | None = None,
    output_dir: str = "bench_out",
    ds_config: str | None = None,
    lr_prompt: float = 0.3,
    lr_lowrank: float = 1e-4,
    mlflow_uri: str = "",
    experiment: str = "dept-bench",
    seed: int = 42,
) -> None:
    """Benchmark DePT against prompt tuning at equal budget (compare), or find the largest backbone that fits (scale).

    Writes bench.md (Markdown table + notes), bench.json (every number, per-step times included) and bench.png
    (time and memory vs m; memory over time in scale mode) to OUTPUT_DIR, prints the table, and logs all of it to
    MLflow when --mlflow_uri is given (pipeline.tracking.Tracker; one run per invocation). Explicit flags override the preset's values. Under ./launch.sh every rank
    runs the command; rank 0 writes.

    Args:
        preset: paper (T5-base geometry, l=100, s=256, padded, batch 32, m in 0..100), paper-rte and paper-boolq
            (the same with dynamic padding on real lengths), paper-t5-small, paper-t5-large, scale-dev (LLaMA,
            hidden 256, 4 layers), scale-llama-1b, scale-llama-3b, scale-llama-7b. Empty for the mode's defaults.
        mode: compare (default) or scale.
        model: random:t5-base (compare default), random:t5-small, random:t5-large, random:llama-7b (scale default), random:tiny-t5
            or another backbone preset, built from its config with random weights; or a local model directory.
        ms: prompt lengths m to run, comma-separated (default 0,20,40,60,80,100; scale mode uses the first, 60).
            Each gets r = rank_for_budget(l, m, s, d); m = l is vanilla PT (r = 0).
        pt_tokens: l, the vanilla prompt length that sets the budget (default 100). Named pt_tokens, not l, since
            the deepspeed launcher would take --l for its own --launcher.
        max_length: s, the longest input and the rows of A (default 256 compare, 64 scale).
        batch_size: global batch over all ranks (default 8 compare, 1 per rank in scale mode, 32 in the
            paper presets).
        grad_accum: micro-batches per step and rank; a step = grad_accum forward/backward passes, then one optimizer
            step (default 1; the paper presets use 4, t5-large 8, so that batch 32 fits in 24 GB of RAM).
        steps: timed steps (rounds) per configuration (default 5 compare, 3 scale).
        warmup: untimed rounds before them (default 1).
        lengths: padded (every input padded to s, the paper's setting), rte or boolq (dynamic padding to the longest
            input of each batch, on the shipped task rendered by the task registry and tokenized; batches follow
            the epoch order, and an epoch-time estimate is reported).
        refs: reference rows, comma-separated from bare,eager,peft,padded (default all of them; none for none).
        infer_tokens: inference = one evaluation batch with this many greedy tokens generated (min = max, so every
            configuration generates the same number); 0 = one eval-mode forward pass instead (default 2).
        infer_repeats: inference timings per configuration, interleaved (default 3; 0 skips inference).
        memory_profile: take one extra untimed step per configuration to measure the peak of its tensors (on CPU
            from the torch.profiler memory events, on GPU from the allocator's peak). Default on.
        tokenizer: tokenizer whose token counts set the lengths (hub name or local directory; its token ids are
            folded into the backbone's vocabulary). Default the backbone's own; the random presets ship a
            1,000-piece test tokenizer, which makes English text about 3x longer than T5's tokenizer would.
        data_dir: folder with <task>/<split>.jsonl (default $DEPT_DATA_DIR, else ../shared/data next to the repo).
        hidden: backbone width override (LLaMA hidden_size, T5 d_model); heads follow at 128 (LLaMA) or 64 (T5)
            per head unless --heads is given.
        layers: layer count override (LLaMA num_hidden_layers; T5 encoder and decoder layers).
        intermediate: feed-forward width override (LLaMA intermediate_size, T5 d_ff).
        heads: attention heads override (LLaMA also sets num_key_value_heads).
        overrides: any other config fields, as a dict or JSON such as '{"num_key_value_heads": 8}'.
        output_dir: where bench.md, bench.json and bench.png go (default bench_out).
        ds_config: DeepSpeed JSON (default ds_configs/zero3_cpu.json in compare mode, zero3_cpu_bf16.json in scale).
        lr_prompt: learning rate of the prompts (0.3). Timing does not depend on it.
        lr_lowrank: learning rate of A and B (1e-4).
        mlflow_uri: MLflow tracking URI such as sqlite:///mlflow.db; empty for no tracking.
        experiment: MLflow experiment name (default dept-bench).
        seed: seed of the random backbone, the prompts and the batch order (default 42).
    """
    os.environ.setdefault("KINETO_LOG_LEVEL", "99")  # torch.profiler's per-start/stop lines on stderr
    explicit = dict(mode=mode, model=model, ms=ms, pt_tokens=pt_tokens, max_length=max_length,
                    batch_size=batch_size, grad_accum=grad_accum, steps=steps, warmup=warmup, lengths=lengths,
                    refs=refs,
                    infer_tokens=infer_tokens, infer_repeats=infer_repeats, ds_config=ds_config, hidden=hidden,
                    layers=layers, intermediate=intermediate, heads=heads)
    settings = resolve_settings(preset, explicit)
    settings.update(memory_profile=bool(memory_profile), tokenizer=tokenizer, data_dir=data_dir,
                    output_dir=output_dir, lr_prompt=float(lr_prompt), lr_lowrank=float(lr_lowrank),
                    mlflow_uri=mlflow_uri, experiment=experiment, seed=int(seed), preset=preset)
    settings["overrides"] = model_overrides(settings, overrides)
    _quiet_libraries()
    if settings["mode"] == "scale":
        run_scale(settings)
    else:
        run_compare(settings)


# ----------------------------------------------------------------------------------------------------- settings


def resolve_settings(preset: str, explicit: dict) -> dict:
    """Explicit flags > preset > the mode's defaults; values checked and normalised."""
    if preset and preset not in PRESETS:
        raise PipelineError(f"unknown bench preset {preset!r}: choose one of {', '.join(PRESETS)}")
    chosen = dict(PRESETS.get(preset, {}))
    chosen.update({k: v for k, v in explicit.items() if v is not None})
    mode = chosen.get("mode") or "compare"
    if mode not in ("compare", "scale"):
        raise PipelineError(f"mode must be compare or scale, got {mode!r}")
    settings = dict(SCALE_DEFAULTS if mode == "scale" else COMPARE_DEFAULTS)
    settings.update(hidden=None, layers=None, intermediate=None, heads=None)
    settings.update(chosen)
    settings["mode"] = mode
    settings["ms"] = parse_ints(settings["ms"], "ms")
    if mode == "scale":
        settings["ms"] = settings["ms"][:1]
    for name in ("pt_tokens", "max_length", "steps", "grad_accum"):
        settings[name] = _int(settings[name], name, minimum=1)
    for name in ("batch_size", "warmup", "infer_tokens", "infer_repeats"):
        settings[name] = _int(settings[name], name, minimum=0)
    if mode == "compare" and settings["batch_size"] < 1:
        raise PipelineError("batch_size must be at least 1")
    bad = [m for m in settings["ms"] if m < 0 or m > settings["pt_tokens"]]
    if bad:
        raise PipelineError(f"every m in --ms must lie in 0..l (l = pt_tokens = {settings['pt_tokens']}); got {bad}")
    if settings["lengths"] not in LENGTHS:
        raise PipelineError(f"lengths must be one of {', '.join(LENGTHS)}, got {settings['lengths']!r}")
    settings["refs"] = parse_refs(settings["refs"])
    if "peft" in settings["refs"] and importlib.util.find_spec("peft") is None:
        if "refs" in explicit and explicit["refs"] is not None:
            raise PipelineError("the peft reference row needs the peft package: pip install peft, or leave peft out "
                                "of --refs")
        settings["refs"].remove("peft")
        log.warning("peft is not installed: the PEFT reference row is left out (pip install peft to include it)")
    if not Path(settings["ds_config"]).is_file():
        raise PipelineError(f"DeepSpeed config {settings['ds_config']} does not exist: pass one of ds_configs/*.json")
    return settings


def parse_ints(value, name: str) -> list[int]:
    """`0,20,40` / 60 / (0, 20) / [0, 20] -> [0, 20, 40] (fire turns `0,20` into a tuple already)."""
    items = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    try:
        out = [int(x) for x in items if str(x) != ""]
    except ValueError:
        raise PipelineError(f"--{name} must be comma-separated integers, got {value!r}") from None
    if not out:
        raise PipelineError(f"--{name} is empty: give at least one value")
    return list(dict.fromkeys(out))


def parse_refs(value) -> list[str]:
    if value in (None, "", "none", False):
        return []
    items = value if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    items = [str(x) for x in items if str(x)]
    if items == ["all"]:
        return list(REFS)
    unknown = [x for x in items if x not in REFS]
    if unknown:
        raise PipelineError(f"unknown reference row(s) {unknown}: choose from {', '.join(REFS)}, all or none")
    return items


def _int(value, name: str, minimum: int) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise PipelineError(f"--{name} must be an integer, got {value!r}") from None
    if number < minimum or float(value) != number:
        raise PipelineError(f"--{name} must be an integer >= {minimum}, got {value!r}")
    return number


def model_overrides(settings: dict, overrides) -> dict:
    """Config-field overrides from --hidden/--layers/--intermediate/--heads plus --overrides (dict or JSON)."""
    if isinstance(overrides, str) and overrides.strip():
        try:
            overrides = json.loads(overrides)
        except json.JSONDecodeError as err:
            raise PipelineError(f"--overrides is not valid JSON ({err.msg}): pass e.g. "
                                "'{\"num_key_value_heads\": 8}'") from None
    out = dict(overrides or {})
    if not isinstance(out, dict):
        raise PipelineError(f"--overrides must be a dict of config fields, got {overrides!r}")
    arch = _arch(settings["model"])
    hidden, layers, inter, heads = (settings.get(k) for k in ("hidden", "layers", "intermediate", "heads"))
    if arch == "llama":
        if hidden:
            out.setdefault("hidden_size", int(hidden))
        if layers:
            out.setdefault("num_hidden_layers", int(layers))
        if inter:
            out.setdefault("intermediate_size", int(inter))
        n_heads = heads or (max(1, int(hidden) // 128) if hidden else None)
        if n_heads:
            out.setdefault("num_attention_heads", int(n_heads))
            out.setdefault("num_key_value_heads", int(n_heads))
    elif arch == "t5":
        if hidden:
            out.setdefault("d_model", int(hidden))
        if layers:
            out.setdefault("num_layers", int(layers))
            out.setdefault("num_decoder_layers", int(layers))
        if inter:
            out.setdefault("d_ff", int(inter))
        n_heads = heads or (max(1, int(hidden) // 64) if hidden else None)
        if n_heads:
            out.setdefault("num_heads", int(n_heads))
            out.setdefault("d_kv", int(out.get("d_model", hidden or 64 * n_heads)) // int(n_heads))
    elif any((hidden, layers, inter, heads)):
        raise PipelineError("--hidden/--layers/--intermediate/--heads need a random:<preset> model; use --overrides "
                            "with the config's own field names for a model directory")
    return out


def _arch(model: str) -> str | None:
    from pipeline.backbone import PRESETS as GEOMETRIES, RANDOM_PREFIX

    if model.startswith(RANDOM_PREFIX):
        preset = GEOMETRIES.get(model[len(RANDOM_PREFIX):])
        return preset["arch"] if preset else None
    return None


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "peft", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def data_folder(data_dir: str) -> str | None:
    """--data_dir, else $DEPT_DATA_DIR, else ../shared/data beside the repository, else None (the hub)."""
    if data_dir:
        return data_dir
    if os.environ.get("DEPT_DATA_DIR"):
        return os.environ["DEPT_DATA_DIR"]
    shipped = REPO.parent / "shared" / "data"
    return str(shipped) if shipped.is_dir() else None


# --------------------------------------------------------------------------------------------------- measuring


class MemorySampler:
    """A background thread that reads this process's RSS (and the system's available memory) every `interval`
    seconds and keeps, per label, the highest RSS seen while that label was current (the configuration running)."""

    def __init__(self, interval: float = 0.01, timeline_every: float = 0.25):
        import psutil

        self._proc = psutil.Process()
        self._psutil = psutil
        self.interval, self.timeline_every = interval, timeline_every
        self.label = "setup"
        self.peak_rss: dict[str, int] = {}
        self.min_available = psutil.virtual_memory().available
        self.total = psutil.virtual_memory().total
        self.timeline: list[tuple[float, int, int, str]] = []  # (t, rss, system used, label)
        self._start = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-memory")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> None:
        rss = self._proc.memory_info().rss
        available = self._psutil.virtual_memory().available
        label = self.label
        self.peak_rss[label] = max(self.peak_rss.get(label, 0), rss)
        self.min_available = min(self.min_available, available)
        now = time.perf_counter() - self._start
        if not self.timeline or now - self.timeline[-1][0] >= self.timeline_every:
            self.timeline.append((round(now, 3), rss, self.total - available, label))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


def _sync() -> None:
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.synchronize()


def _on_cpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() == "cpu"


def tensor_peak(step) -> tuple[float, float | None]:
    """Run `step()` once and return (transient tensor peak MB, absolute allocator peak MB or None).

    CPU: torch.profiler with profile_memory=True records every CPU tensor allocation and free; the running sum
    in time order, maximised, is the highest amount of tensor memory the step held on top of what was live when it
    started (activations, gathered ZeRO-3 parameters, gradients, optimizer temporaries; not the resident model and
    optimizer state, and not the allocator's cached or fragmented pages, which RSS shows). GPU: the accelerator
    allocator's max_memory_allocated during the step, minus memory_allocated before it (and the absolute peak).
    """
    import torch
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.synchronize()
        accel.reset_peak_memory_stats()
        before = accel.memory_allocated()
        step()
        accel.synchronize()
        peak = accel.max_memory_allocated()
        return (peak - before) / 2**20, peak / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type() == torch.autograd.DeviceType.CPU]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak / 2**20, None


def summary(values: list[float]) -> dict:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return {"median": None, "min": None, "max": None, "mean": None, "n": 0}
    return {"median": statistics.median(finite), "min": min(finite), "max": max(finite),
            "mean": statistics.fmean(finite), "n": len(finite)}


def paired(a: list[float], b: list[float]) -> dict:
    """Ratios a_i / b_i of steps taken in the same round (side by side), summarised."""
    return summary([x / y for x, y in zip(a, b) if y])


def rss_mb() -> float:
    """This process's peak resident set size (Linux ru_maxrss, KiB) in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------------ models


def _torch_modules():
    """Module classes built on first use (torch is imported only when the command runs)."""
    global BareInput, BenchModel
    if "BareInput" in globals():
        return BareInput, BenchModel
    import torch
    from torch import nn

    from pipeline.backbone import DePTModel

    class _BareInput(nn.Module):
        """No prompt: one trainable vector [d], zero at start, added to every input embedding. It makes the backward
        pass run through the whole encoder to the input, as it must for any prompt method, and gives the engine
        something to optimise; its cost is one addition."""

        def __init__(self, d_model: int):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(d_model))

        def forward(self, inputs_embeds, attention_mask, labels=None):
            return inputs_embeds + self.bias.to(inputs_embeds.dtype), attention_mask, labels

    class _BenchModel(DePTModel):
        """`DePTModel` with several prompt modules over one backbone: `forward(variant, ...)` makes the named one
        the model's prompt and runs `DePTModel.forward` unchanged. One module tree means one ZeRO-3 engine over one
        sharded backbone (a second engine on the same backbone would hook it twice)."""

        def __init__(self, backbone, prompts: dict, is_encoder_decoder: bool):
            super().__init__(backbone, None, is_encoder_decoder)
            self.prompts = nn.ModuleDict(prompts)

        def use(self, variant: str) -> "_BenchModel":
            self.prompt = self.prompts[variant]
            return self

        def forward(self, variant, input_ids, attention_mask, labels=None):
            return self.use(variant).forward_with_prompt(input_ids, attention_mask, labels)

        def forward_with_prompt(self, input_ids, attention_mask, labels=None):
            return DePTModel.forward(self, input_ids, attention_mask, labels)

    BareInput, BenchModel = _BareInput, _BenchModel
    return BareInput, BenchModel


@dataclass
class Variant:
    """One configuration of the table."""

    key: str                 # slug: json / MLflow key
    label: str               # table label
    kind: str                # dept | bare | peft
    harness: str             # engine | eager
    m: int = 0               # prompt length (bare: extra input tokens)
    r: int = 0
    trainable: int = 0
    pad_to: int | None = None
    module: str = ""         # prompt module name inside the harness
    times: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    enc_tokens: list = field(default_factory=list)
    real_tokens: list = field(default_factory=list)
    infer: list = field(default_factory=list)
    step_peak_mb: float | None = None
    alloc_peak_mb: float | None = None
    rss_peak_mb: float | None = None


def plan_variants(settings: dict, d_model: int) -> list[Variant]:
    """The configurations of a compare run: DePT/PT rows at equal budget, then the reference rows."""
    from pipeline.dept import count_trainable, rank_for_budget

    s, l = settings["max_length"], settings["pt_tokens"]
    refs = settings["refs"]
    pad_main = s if settings["lengths"] == "padded" else None
    rows: list[Variant] = []
    for m in settings["ms"]:
        r = rank_for_budget(l, m, s, d_model)
        if r > min(s, d_model):
            log.warning("m=%d: the budget of l=%d gives r=%d > min(s, d) = %d; r is capped (fewer parameters than PT)",
                        m, l, r, min(s, d_model))
            r = min(s, d_model)
        if m == 0 and r == 0:
            raise PipelineError(f"m=0 gets rank r=0 at l={l}, s={s}, d={d_model}: nothing to train; drop 0 from --ms "
                                "or raise --pt_tokens")
        label = f"PT l={m}" if r == 0 else f"DePT m={m} r={r}"
        key = f"pt_l{m}" if r == 0 else f"dept_m{m}_r{r}"
        rows.append(Variant(key, label, "dept", "engine", m, r, count_trainable(m, r, s, d_model), pad_main, key))
    pt = next((v for v in rows if v.m == l), None)
    if "padded" in refs and pad_main is None:
        rows.append(Variant(f"pt_l{l}_pad{s}", f"PT l={l}, padded to s={s}", "dept", "engine", l, 0,
                            count_trainable(l, 0, s, d_model), s, pt.module if pt else f"pt_l{l}"))
    if "bare" in refs:
        for m in sorted({v.m for v in rows if v.harness == "engine" and v.pad_to == pad_main}):
            rows.append(Variant(f"bare_p{m}", f"bare, input L+{m}", "bare", "engine", m, 0, d_model, pad_main, "bare"))
    if "eager" in refs:
        rows.append(Variant(f"eager_bare_p{l}", f"bare, input L+{l}, no engine", "bare", "eager", l, 0, d_model,
                            pad_main, "bare"))
        rows.append(Variant(f"eager_pt_l{l}", f"PT l={l}, no engine", "dept", "eager", l, 0,
                            count_trainable(l, 0, s, d_model), pad_main, f"pt_l{l}"))
    if "peft" in refs:
        rows.append(Variant(f"peft_pt_l{l}", f"PEFT PT l={l} (1 submodule), no engine", "peft", "eager", l, 0,
                            l * d_model, pad_main, "peft"))
    return rows


def _tokenized_rows(settings: dict, backbone, world: int) -> tuple[list[dict], dict]:
    """Rendered rows of the chosen task, tokenized to s, with a description of their length distribution."""
    from pipeline.backbone import load_tokenizer
    from pipeline.data import tokenize
    from pipeline.tasks import get_task, load_raw_split

    task_name = LENGTHS[settings["lengths"]]
    folder = data_folder(settings["data_dir"])
    raw, where, errors = None, "", []
    for split in ("train", "validation"):
        try:
            raw = load_raw_split(task_name, split, folder)
            where = f"{task_name} {split} ({len(raw)} rows, {folder or 'hub'})"
            break
        except PipelineError as err:
            errors.append(str(err))
    if raw is None:
        if settings["lengths"] != "padded":
            raise PipelineError(f"no {task_name} data for --lengths {settings['lengths']}: {errors[-1]}")
        raw, where = None, "synthetic rows (no RTE data found); every input is padded to s"
    if raw is None:
        import random

        from pipeline.tokenizer import words

        rng, vocab = random.Random(settings["seed"]), words()
        rows = [{"source": " ".join(rng.choice(vocab) for _ in range(rng.randint(20, 120))), "target": "1"}
                for _ in range(max(256, settings["batch_size"] * 4))]
    else:
        task = get_task(task_name)
        rows = [task.render(row) for row in raw]
    tok = load_tokenizer(settings["tokenizer"], os.environ.get("DEPT_CACHE")) if settings["tokenizer"] \
        else backbone.tokenizer
    tokenized = tokenize(rows, tok, backbone.is_encoder_decoder, settings["max_length"], max_target_length=8)
    vocab = backbone.model.get_input_embeddings().num_embeddings
    if settings["tokenizer"]:
        for row in tokenized:  # another tokenizer's ids, folded into this backbone's vocabulary
            for key in ("input_ids", "labels", "prompt_ids"):
                row[key] = [t % vocab if t >= 0 else t for t in row[key]]
    lens = sorted(len(r["input_ids"]) for r in tokenized)
    n = len(lens)
    info = {"source": where, "tokenizer": settings["tokenizer"] or f"{settings['model']}'s own",
            "rows": n, "median": lens[n // 2], "p90": lens[min(n - 1, int(0.9 * n))], "max": lens[-1],
            "at_s_fraction": sum(x >= settings["max_length"] for x in lens) / n,
            "batches_per_epoch": max(n // settings["batch_size"], 1)}
    if settings["batch_size"] % world:
        raise PipelineError(f"batch_size {settings['batch_size']} is not divisible by the {world} ranks")
    return tokenized, info


def _batch(rows: list[dict], ids: list[int], variant: Variant, pad_id: int, is_ed: bool, generation=False):
    """The variant's tensors for rows `ids`: padded as the variant pads; bare rows get m extra real-length inputs
    (mask 1, label -100), so the backbone sees exactly the tensor shape the prompt methods give it."""
    import torch

    from pipeline.data import IGNORE, collate

    batch = collate([rows[i] for i in ids], pad_id, is_ed, variant.pad_to, for_generation=generation)
    real = int(batch["attention_mask"].sum())
    if variant.kind == "bare" and variant.m:
        b, m = batch["input_ids"].shape[0], variant.m
        batch["input_ids"] = torch.cat([torch.full((b, m), FILLER_ID, dtype=torch.long), batch["input_ids"]], 1)
        batch["attention_mask"] = torch.cat([torch.ones(b, m, dtype=torch.long), batch["attention_mask"]], 1)
        if not is_ed and "labels" in batch:
            batch["labels"] = torch.cat([torch.full((b, m), IGNORE, dtype=torch.long), batch["labels"]], 1)
    width = batch["input_ids"].shape[1] + (variant.m if variant.kind != "bare" else 0)
    return batch, real, width


# ----------------------------------------------------------------------------------------------------- compare


def run_compare(settings: dict) -> dict | None:
    import deepspeed
    import torch

    from pipeline import distributed
    from pipeline.backbone import embedding_rows, load_backbone
    from pipeline.data import global_batch
    from pipeline.dept import DePTPrompt, DeptConfig, init_prompt_, prompt_init_ids
    from pipeline.train import TrainConfig, ds_dtype, load_ds_config, param_groups, warmup_then_linear_decay

    rank, world = distributed.init()
    bare_cls, bench_cls = _torch_modules()
    s, l = settings["max_length"], settings["pt_tokens"]
    tcfg = TrainConfig(model=settings["model"], output_dir=settings["output_dir"], ds_config=settings["ds_config"],
                       method="dept", max_length=s, batch_size=settings["batch_size"],
                       grad_accum=settings["grad_accum"], lr_prompt=settings["lr_prompt"],
                       lr_lowrank=settings["lr_lowrank"], steps=10**6, warmup_steps=0, seed=settings["seed"],
                       model_overrides=settings["overrides"])
    ds = load_ds_config(settings["ds_config"], tcfg, world)
    dtype = ds_dtype(ds)
    cache = os.environ.get("DEPT_CACHE")
    needs_plain = bool({"eager", "peft"} & set(settings["refs"]))

    with MemorySampler() as sampler:
        tick = time.perf_counter()
        plain = None
        if needs_plain:  # built first, while no HfDeepSpeedConfig is alive, so it is an ordinary (unsharded) model
            torch.manual_seed(settings["seed"])
            plain = load_backbone(settings["model"], None, dtype, settings["overrides"], cache_dir=cache)
        torch.manual_seed(settings["seed"])
        backbone = load_backbone(settings["model"], ds, dtype, settings["overrides"], cache_dir=cache)
        load_s = time.perf_counter() - tick
        d = backbone.d_model
        variants = plan_variants(settings, d)
        rows, length_info = _tokenized_rows(settings, backbone, world)

        # Engine rows: one DePTPrompt per (m, r), initialised as `train.build_model` does (TEXT init), plus `bare`.
        prompts, groups = {}, []
        for v in variants:
            if v.harness != "engine" or v.module in prompts:
                continue
            if v.kind == "bare":
                prompts[v.module] = bare_cls(d)
                groups.append({"name": "bare", "params": [prompts[v.module].bias], "lr": settings["lr_lowrank"]})
                continue
            cfg = DeptConfig(num_virtual_tokens=v.m, r=v.r, max_length=s, d_model=d)
            torch.manual_seed(settings["seed"])
            prompt = DePTPrompt(cfg)
            vocab = backbone.model.get_input_embeddings().num_embeddings
            ids = prompt_init_ids(cfg, backbone.tokenizer, vocab, settings["seed"])
            init_prompt_(prompt, None if ids is None else embedding_rows(backbone, ids), settings["seed"])
            prompts[v.module] = prompt
        model = bench_cls(backbone.model, prompts, backbone.is_encoder_decoder)
        for name, prompt in prompts.items():
            if isinstance(prompt, DePTPrompt):
                groups += param_groups(model.use(name), tcfg)
        model.prompt = None
        optimizer = torch.optim.AdamW(groups, eps=1e-6, weight_decay=0.0)
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, warmup_then_linear_decay(0, 10**6)),
        )
        device = engine.device

        eager_model = peft_model = eager_opt = peft_opt = None
        if plain is not None:
            _copy_weights(backbone.model, plain.model)
            plain.model.to(device)
            eager_prompts = {}
            if "eager" in settings["refs"]:
                torch.manual_seed(settings["seed"])
                eager_prompts = {"bare": bare_cls(d),
                                 f"pt_l{l}": DePTPrompt(DeptConfig(num_virtual_tokens=l, r=0, max_length=s, d_model=d,
                                                                   prompt_init="RANDOM"))}
                init_prompt_(eager_prompts[f"pt_l{l}"], None, settings["seed"])
            eager_model = bench_cls(plain.model, eager_prompts, plain.is_encoder_decoder).to(device)
            if eager_prompts:
                eager_opt = torch.optim.AdamW([p for p in eager_model.prompts.parameters()], lr=settings["lr_lowrank"],
                                              eps=1e-6, weight_decay=0.0)
            if "peft" in settings["refs"]:
                peft_model = _peft(plain, l, settings["seed"]).to(device)
                peft_opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad],
                                             lr=settings["lr_prompt"], eps=1e-6, weight_decay=0.0)
        if rank == 0:
            log.info("bench: %d configurations, %d warm-up + %d timed rounds, lengths=%s (%s)", len(variants),
                     settings["warmup"], settings["steps"], settings["lengths"], length_info["source"])

        pad_id = backbone.tokenizer.pad_token_id
        is_ed = backbone.is_encoder_decoder
        accum = settings["grad_accum"]
        micro = settings["batch_size"] // (world * accum)

        def step_fn(v: Variant, batches: list[dict]):
            """One optimizer step over this rank's micro-batches; returns the mean loss (a tensor)."""
            if v.harness == "engine":  # DeepSpeed steps the optimizer at the accumulation boundary
                def run():
                    total = 0.0
                    for batch in batches:
                        out = engine(variant=v.module, **batch)
                        engine.backward(out.loss)
                        engine.step()
                        total = total + out.loss.detach() / len(batches)
                    return total
                return run
            model, opt = (peft_model, peft_opt) if v.kind == "peft" else (eager_model, eager_opt)
            call = (lambda batch: model(**batch)) if v.kind == "peft" else (lambda batch: model(v.module, **batch))

            def run():
                total = 0.0
                for batch in batches:
                    loss = call(batch).loss
                    (loss / len(batches)).backward()
                    total = total + loss.detach() / len(batches)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return total
            return run

        def rank_slice(step: int) -> list[list[int]]:
            """This rank's micro-batches of global batch `step` (the layout of train.py)."""
            ids = global_batch(len(rows), settings["batch_size"], step, settings["seed"])
            return [ids[(a * world + rank) * micro:(a * world + rank + 1) * micro] for a in range(accum)]

        def tensors(parts: list[list[int]], v: Variant, generation: bool = False):
            made = [_batch(rows, ids, v, pad_id, is_ed, generation) for ids in parts]
            batches = [{k: t.to(device) for k, t in b.items()} for b, _, _ in made]
            return batches, sum(real for _, real, _ in made), statistics.fmean(w for _, _, w in made)

        # Round-robin: each round one step of every configuration on the same batch, starting position rotating.
        total_rounds = settings["warmup"] + settings["steps"]
        n = len(variants)
        for round_index in range(total_rounds):
            parts = rank_slice(round_index)
            timed = round_index >= settings["warmup"]
            for j in range(n):
                v = variants[(round_index + j) % n]
                batches, real, width = tensors(parts, v)
                run = step_fn(v, batches)
                sampler.label = v.key
                _sync()
                start = time.perf_counter()
                loss = run()
                _sync()
                elapsed = time.perf_counter() - start
                sampler.label = "between"
                if timed:
                    v.times.append(elapsed)
                    v.losses.append(float(loss.detach().float().item()))
                    v.real_tokens.append(real)
                    v.enc_tokens.append(width)
            if rank == 0:
                log.info("round %d/%d done%s", round_index + 1, total_rounds, "" if timed else " (warm-up)")

        if settings["memory_profile"]:
            parts = rank_slice(0)
            for v in variants:
                batches, _, _ = tensors(parts, v)
                sampler.label = v.key
                v.step_peak_mb, v.alloc_peak_mb = tensor_peak(step_fn(v, batches))
                sampler.label = "between"

        if settings["infer_repeats"]:
            engine.module.eval()
            if eager_model is not None:
                eager_model.eval()
            if peft_model is not None:
                peft_model.eval()
            parts = rank_slice(0)[:1]  # one evaluation batch: this rank's first micro-batch
            for repeat in range(settings["infer_repeats"]):
                for j in range(n):
                    v = variants[(repeat + j) % n]
                    gen = settings["infer_tokens"] > 0
                    (batch,), _, _ = tensors(parts, v, generation=gen)
                    sampler.label = v.key
                    _sync()
                    start = time.perf_counter()
                    _infer(v, batch, engine.module, eager_model, peft_model, settings["infer_tokens"], world)
                    _sync()
                    v.infer.append(time.perf_counter() - start)
                    sampler.label = "between"
            engine.module.train()

    for v in variants:
        v.rss_peak_mb = sampler.peak_rss.get(v.key, 0) / 2**20
    per_rank = distributed.gather_objects([{
        "rank": rank, "times": {v.key: v.times for v in variants}, "infer": {v.key: v.infer for v in variants},
        "step_peak": {v.key: v.step_peak_mb for v in variants}, "rss_peak": {v.key: v.rss_peak_mb for v in variants},
        "losses": {v.key: v.losses for v in variants}, "real": {v.key: v.real_tokens for v in variants},
        "ru_maxrss_mb": rss_mb(), "min_available_mb": sampler.min_available / 2**20,
    }])
    result = None
    if rank == 0:
        result = compare_report(settings, variants, per_rank, world, length_info, load_s, d, sampler.total, dtype)
        write_outputs(settings, result, plot_compare)
    track(settings, result)
    distributed.barrier()
    return result


def _copy_weights(sharded, plain) -> None:
    """Copy the ZeRO-3 backbone's weights into the plain copy (gathered one parameter at a time)."""
    import torch

    from pipeline.backbone import gathered

    src = dict(sharded.named_parameters())
    with torch.no_grad():
        for name, param in plain.named_parameters():
            if name not in src:
                raise PipelineError(f"internal: parameter {name} missing from the sharded backbone")
            with gathered([src[name]]):
                param.copy_(src[name].data.to(param.dtype))


def _peft(plain, l: int, seed: int):
    """PEFT's PromptTuning with l tokens on the plain backbone; encoder only (num_transformer_submodules=1)."""
    import torch
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model

    task = TaskType.SEQ_2_SEQ_LM if plain.is_encoder_decoder else TaskType.CAUSAL_LM
    torch.manual_seed(seed)
    config = PromptTuningConfig(task_type=task, num_virtual_tokens=l, num_transformer_submodules=1,
                                prompt_tuning_init=PromptTuningInit.RANDOM, token_dim=plain.d_model)
    return get_peft_model(plain.model, config)


def _infer(v: Variant, batch, engine_module, eager_model, peft_model, new_tokens: int, world: int):
    """One evaluation batch: `new_tokens` greedy tokens (exactly that many), or one eval forward when 0."""
    import torch

    with torch.no_grad():
        if v.kind == "peft":
            if new_tokens:
                peft_model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1)
            else:
                peft_model(**batch)
            return
        harness = engine_module if v.harness == "engine" else eager_model
        model = harness.use(v.module)
        if not new_tokens:
            model.forward_with_prompt(**batch)
            return
        embeds, mask, _ = model._inputs(batch["input_ids"], batch["attention_mask"])
        model.backbone.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                                synced_gpus=v.harness == "engine" and world > 1)


# ------------------------------------------------------------------------------------------------------ report

COLUMNS = ["config", "harness", "m", "r", "trainable", "enc_tokens", "step_s", "step_range_s", "tokens_per_s",
           "x_pt", "x_bare_same_len", "step_tensor_peak_mb", "rss_peak_mb", "infer_s", "epoch_s"]
HEADERS = {"config": "configuration", "harness": "harness", "m": "m", "r": "r", "trainable": "trainable params",
           "enc_tokens": "input tokens (m + L)", "step_s": "step s (median)", "step_range_s": "step s (min .. max)",
           "tokens_per_s": "tokens/s", "x_pt": "time / PT l", "x_bare_same_len": "time / bare same length",
           "step_tensor_peak_mb": "step tensor peak MB", "rss_peak_mb": "RSS peak MB",
           "infer_s": "inference s (median)", "epoch_s": "epoch est. s"}


def compare_report(settings, variants, per_rank, world, length_info, load_s, d_model, total_ram, dtype) -> dict:
    """Everything measured, the table rows, the paired ratios and the targets of the issue."""
    # A step ends when the slowest rank ends: per step, the max over ranks.
    for v in variants:
        v.times = [max(r["times"][v.key][i] for r in per_rank) for i in range(len(v.times))]
        v.infer = [max(r["infer"][v.key][i] for r in per_rank) for i in range(len(v.infer))]
        peaks = [r["step_peak"][v.key] for r in per_rank if r["step_peak"][v.key] is not None]
        v.step_peak_mb = max(peaks) if peaks else None
        v.rss_peak_mb = max(r["rss_peak"][v.key] for r in per_rank)
        v.real_tokens = [sum(r["real"][v.key][i] for r in per_rank) for i in range(len(v.real_tokens))]
    by_key = {v.key: v for v in variants}
    l, s = settings["pt_tokens"], settings["max_length"]
    pad_main = s if settings["lengths"] == "padded" else None
    pt = next((v for v in variants if v.harness == "engine" and v.m == l and v.r == 0 and v.pad_to == pad_main), None)
    bare = {v.m: v for v in variants if v.kind == "bare" and v.harness == "engine"}
    eager_pt = by_key.get(f"eager_pt_l{l}")
    eager_bare = by_key.get(f"eager_bare_p{l}")
    peft = by_key.get(f"peft_pt_l{l}")

    def baseline_pt(v):
        if v.harness == "eager":
            return eager_pt if v.kind != "bare" else eager_bare
        return bare.get(l) if v.kind == "bare" else pt

    table = []
    for v in variants:
        step = summary(v.times)
        x_pt = paired(v.times, baseline_pt(v).times) if baseline_pt(v) not in (None, v) else None
        same = eager_bare if v.harness == "eager" and v.kind != "bare" else bare.get(v.m)
        x_bare = paired(v.times, same.times) if same is not None and same is not v and v.kind != "bare" else None
        mean_step = step["mean"]
        table.append({
            "key": v.key, "config": v.label,
            "harness": "DeepSpeed ZeRO-3" if v.harness == "engine" else "plain PyTorch",
            "kind": v.kind, "m": v.m, "r": v.r, "trainable": v.trainable, "pad_to": v.pad_to,
            "enc_tokens": statistics.fmean(v.enc_tokens) if v.enc_tokens else None,
            "step_s": step["median"], "step_min_s": step["min"], "step_max_s": step["max"], "step_mean_s": mean_step,
            "tokens_per_s": statistics.fmean(v.real_tokens) / step["median"] if v.times and step["median"] else None,
            "x_pt": x_pt, "x_bare_same_len": x_bare,
            "step_tensor_peak_mb": v.step_peak_mb, "rss_peak_mb": v.rss_peak_mb,
            "alloc_peak_mb": v.alloc_peak_mb,
            "infer_s": summary(v.infer)["median"], "infer_range_s": [summary(v.infer)["min"], summary(v.infer)["max"]],
            "epoch_s": mean_step * length_info["batches_per_epoch"] if mean_step else None,
            "times_s": v.times, "infer_times_s": v.infer, "losses": v.losses,
            "loss_finite": all(math.isfinite(x) for x in v.losses),
        })
    targets = compare_targets(settings, variants, pt, bare, eager_pt, eager_bare, peft)
    on_cpu = _on_cpu()
    return {
        "mode": "compare", "settings": _jsonable(settings), "world_size": world, "d_model": d_model,
        "dtype": str(dtype).replace("torch.", ""), "device": "cpu" if on_cpu else "accelerator",
        "load_s": load_s, "lengths": length_info, "rows": table, "targets": targets,
        "total_ram_mb": total_ram / 2**20,
        "ranks": [{"rank": r["rank"], "ru_maxrss_mb": r["ru_maxrss_mb"], "min_available_mb": r["min_available_mb"]}
                  for r in per_rank],
        "notes": compare_notes(settings, length_info, world, on_cpu),
    }


def compare_targets(settings, variants, pt, bare, eager_pt, eager_bare, peft) -> list[dict]:
    """The questions of the issue, one row each: `value` = median of the ratios of steps taken in the same round
    (with min and max over rounds), the target, and whether it is met. `key` names the MLflow metric."""
    l = settings["pt_tokens"]
    out = []

    def dept_at(m):
        return next((v for v in variants if v.harness == "engine" and v.kind == "dept" and v.m == m
                     and v.pad_to == (pt.pad_to if pt else None)), None)

    def add(key, name, value, target, ok, note=""):
        verdict = "n/a" if value is None or value.get("median") is None or ok is None else ("meets" if ok else "misses")
        out.append({"key": key, "name": name, "value": value, "target": target, "verdict": verdict, "note": note})

    def at_most(value, limit):
        return value["median"] is not None and value["median"] <= limit

    # The paper's two settings at l = 100 (m = 60, r = 30 and m = 40, r = 45); scaled with l otherwise.
    m60, m40 = round(0.6 * l), round(0.4 * l)
    for m, limit, gap_target in ((m60, 0.87, 2.0), (m40, 0.80, None)):
        dept = dept_at(m)
        if dept is None or pt is None or dept is pt:
            continue
        ratio = paired(dept.times, pt.times)
        add(f"time.dept_m{m}_over_pt", f"step time DePT m={m} r={dept.r} / PT l={l}", ratio, f"<= {limit:.2f}",
            at_most(ratio, limit))
        if m in bare and l in bare:
            floor = paired(bare[m].times, bare[l].times)
            add(f"time.bare_p{m}_over_bare_p{l}", f"bare backbone, input L+{m} / L+{l} (the floor for the ratio "
                "above)", floor, "reference", None, "what the shorter input alone saves")
            gap = summary([100 * (a / b - c / e) for a, b, c, e in
                           zip(dept.times, pt.times, bare[m].times, bare[l].times) if b and e])
            add(f"gap.dept_m{m}_minus_bare_points", f"DePT m={m} ratio minus bare ratio (points)", gap,
                "<= +2" if gap_target is not None else "reference",
                at_most(gap, gap_target) if gap_target is not None else None)
        if dept.step_peak_mb and pt.step_peak_mb:
            mem = {"median": dept.step_peak_mb / pt.step_peak_mb, "min": None, "max": None, "n": 1}
            add(f"memory.dept_m{m}_over_pt", f"step tensor peak DePT m={m} / PT l={l}", mem,
                "reference (paper: > 20% less)", None, "one profiled step each")
    for v in [pt, dept_at(m60), dept_at(m40)]:
        if v is not None and v.m in bare and v.kind == "dept":
            overhead = summary([100 * (a / b - 1) for a, b in zip(v.times, bare[v.m].times) if b])
            add(f"overhead.{v.key}_pct", f"pipeline overhead: {v.label} vs bare backbone at the same length (%)",
                overhead, "<= 5%", at_most(overhead, 5.0),
                "both through the same DeepSpeed engine, so this is the DePT module and its optimizer step")
    if eager_pt is not None and peft is not None:
        ratio = summary([100 * (a / b - 1) for a, b in zip(eager_pt.times, peft.times) if b])
        add("peft.our_pt_vs_peft_pct", f"our PT l={l} vs PEFT PT l={l}, both without engine (%)", ratio,
            "within +-5%", ratio["median"] is not None and abs(ratio["median"]) <= 5.0,
            "PEFT with num_transformer_submodules=1")
    if pt is not None and peft is not None:
        add("peft.our_pt_engine_over_peft", f"our PT l={l} through DeepSpeed ZeRO-3 / PEFT PT l={l} in a plain loop",
            paired(pt.times, peft.times), "reference", None, "what a user sees, engine cost included")
    if bare.get(l) is not None and eager_bare is not None:
        add("engine.bare_engine_over_plain", f"ZeRO-3 engine cost: bare L+{l} through the engine / without",
            paired(bare[l].times, eager_bare.times), "reference", None)
    padded = next((v for v in variants if v.key == f"pt_l{l}_pad{settings['max_length']}"), None)
    dept60 = dept_at(m60)
    if padded is not None and dept60 is not None:
        per_round = paired(dept60.times, padded.times)
        ratio = {"median": sum(dept60.times) / sum(padded.times), "min": per_round["min"], "max": per_round["max"],
                 "n": len(dept60.times)}
        add(f"epoch.dept_m{m60}_dynamic_over_pt_padded", f"epoch time DePT m={m60} ({settings['lengths']} lengths, "
            f"dynamic padding) / PT l={l} padded to s={settings['max_length']}", ratio, "< 0.5 expected",
            ratio["median"] < 0.5, "sum over the same sampled batches of the epoch order; [min .. max] per batch")
    return out


def compare_notes(settings, info, world, on_cpu) -> list[str]:
    s, l = settings["max_length"], settings["pt_tokens"]
    overrides = f" and overrides {json.dumps(settings['overrides'])}" if settings["overrides"] else ""
    padding = "every input padded to s" if settings["lengths"] == "padded" else "each batch padded to its longest input"
    rows_per_eval = settings["batch_size"] // (world * settings["grad_accum"])
    notes = [
        f"Backbone {settings['model']} with random weights{overrides}; "
        f"l={l}, s={s}, global batch {settings['batch_size']} over {world} rank(s) x {settings['grad_accum']} "
        f"micro-batch(es) per step; DeepSpeed config "
        f"{Path(settings['ds_config']).name}.",
        f"Lengths: {settings['lengths']} ({padding}); "
        f"data {info['source']}; tokenizer {info['tokenizer']}: median {info['median']}, p90 {info['p90']}, max "
        f"{info['max']} tokens, {100 * info['at_s_fraction']:.0f}% at s (truncated); {info['batches_per_epoch']} "
        "batches per epoch.",
        f"Timing: {settings['warmup']} warm-up + {settings['steps']} timed rounds; each round runs one step of every "
        "configuration (round-robin, starting position rotating) on the same batch, the next batch of the epoch "
        "order. step s = forward + backward + optimizer step, median over rounds (min-max beside it); with several "
        "ranks a step's time is that of the slowest rank. Ratios (time / PT l, time / bare, targets) are medians of "
        "ratios taken within each round, i.e. of steps run side by side.",
        "Rows through DeepSpeed ZeRO-3 share one engine over one sharded backbone (all prompt modules in one "
        "module tree), so the optimizer step covers every configuration's few trainable tensors (< 0.1% of a "
        "step at T5-base size) and ZeRO-3's prefetch trace is rebuilt when the module order changes between "
        "rounds; the bare rows pay both the same way, so the pipeline-overhead ratio isolates the DePT module.",
        "bare = the backbone alone, fed an input of the same total length (m extra tokens in place of the prompt) "
        "with one trainable [d] vector added to the input embeddings, so that its backward pass also reaches "
        "the input: the floor for any prompt method. Engine bare rows give the pipeline overhead (same engine); "
        "the no-engine rows (bare, our PT module, PEFT) run a plain PyTorch loop (AdamW) on a copy of the same "
        "weights and the same batches: our PT vs PEFT is compared there, like for like.",
        f"PEFT PromptTuning uses num_transformer_submodules=1: prompts on the encoder only, {l} x d parameters. PEFT's "
        "seq2seq default (2) also prompts the decoder, i.e. twice the parameters and not the same budget."
        if _arch(settings["model"]) != "llama" else "PEFT PromptTuning (CAUSAL_LM) with l tokens.",
        "tokens/s = real (non-pad) source tokens of the global batch (mean over rounds) / median step time.",
        ("Memory: 'step tensor peak MB' = the highest amount of CPU tensor memory one training step held above "
         "what was live when it started (torch.profiler memory events: allocations minus frees, in order; "
         "activations, gathered ZeRO-3 parameters, gradients, optimizer temporaries), from one extra untimed step; "
         "'RSS peak MB' = the process's resident memory, sampled every 10 ms while that configuration ran "
         "(process-wide: the model, the plain copy, and pages the allocator keeps after earlier configurations, so "
         "it differs little between rows). Max over ranks."
         if on_cpu else
         "Memory: 'step tensor peak MB' = the accelerator allocator's max_memory_allocated during one extra step "
         "minus memory_allocated before it; 'RSS peak MB' = host resident memory while the configuration ran."),
        (f"Inference = one evaluation batch (this rank's {rows_per_eval} rows), "
         + (f"exactly {settings['infer_tokens']} greedy tokens generated (min_new_tokens = max_new_tokens)"
            if settings["infer_tokens"] else "one eval-mode forward pass with the targets")
         + f", median of {settings['infer_repeats']} interleaved repeats."),
        "epoch est. s = mean step time over the sampled batches x batches per epoch.",
    ]
    if not settings["tokenizer"] and settings["model"].startswith("random:") and settings["lengths"] != "padded":
        notes.append("The random: presets' 1,000-piece test tokenizer makes English text about 3x longer than T5's "
                     "32k SentencePiece; pass --tokenizer (a T5 tokenizer directory) for T5's real lengths.")
    return notes


def _jsonable(settings: dict) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in settings.items()}


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _count(n: int) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M"


def fmt_ratio(value: dict | None) -> str:
    if not value or value.get("median") is None:
        return "-"
    if value.get("min") is None:
        return fmt(value["median"])
    return f"{fmt(value['median'])} [{fmt(value['min'])} .. {fmt(value['max'])}]"


def compare_markdown(result: dict) -> str:
    st = result["settings"]
    lines = [f"# dept bench: {st['model']}, l={st['pt_tokens']}, s={st['max_length']}, "
             f"lengths={st['lengths']}, batch {st['batch_size']}, {result['world_size']} rank(s), {result['dtype']}",
             "", "| " + " | ".join(HEADERS[c] for c in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in result["rows"]:
        cells = []
        for c in COLUMNS:
            if c == "step_range_s":
                cells.append(f"{fmt(row['step_min_s'])} .. {fmt(row['step_max_s'])}")
            elif c in ("x_pt", "x_bare_same_len"):
                cells.append(fmt_ratio(row[c]))
            elif c == "enc_tokens":
                cells.append(fmt(row[c], 4))
            else:
                cells.append(fmt(row[c]) if not isinstance(row[c], str) else row[c])
        lines.append("| " + " | ".join(cells) + " |")
    if result["targets"]:
        lines += ["", "## Targets", "", "| question | value: median [min .. max] | target | verdict |",
                  "|---|---|---|---|"]
        for t in result["targets"]:
            lines.append(f"| {t['name']} | {fmt_ratio(t['value'])} | {t['target']} | {t['verdict']} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot_compare(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    pad_main = result["settings"]["max_length"] if result["settings"]["lengths"] == "padded" else None
    main = [r for r in rows if r["kind"] == "dept" and r["harness"].startswith("DeepSpeed") and r["pad_to"] == pad_main]
    bare = [r for r in rows if r["kind"] == "bare" and r["harness"].startswith("DeepSpeed")]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for series, label, style in ((main, "DePT / PT (engine)", "o-"), (bare, "bare backbone, input L+m", "s--")):
        series = sorted(series, key=lambda r: r["m"])
        if not series:
            continue
        xs = [r["m"] for r in series]
        med = [r["step_s"] for r in series]
        err = [[r["step_s"] - r["step_min_s"] for r in series], [r["step_max_s"] - r["step_s"] for r in series]]
        ax_t.errorbar(xs, med, yerr=err, fmt=style, capsize=3, label=label)
        peaks = [r["step_tensor_peak_mb"] for r in series]
        if all(p is not None for p in peaks):
            ax_m.plot(xs, peaks, style, label=f"{label}: step tensor peak")
    refs = [r for r in rows if r["harness"].startswith("plain") or (r["kind"] == "dept" and r not in main)]
    for i, r in enumerate(refs):  # rows without an m axis: horizontal lines, labels staggered so they don't overlap
        ax_t.axhline(r["step_s"], linestyle=":", linewidth=1, color="grey")
        ax_t.text(0.01 + 0.33 * (i % 3), r["step_s"], r["config"], transform=ax_t.get_yaxis_transform(),
                  fontsize=6.5, color="dimgrey", va="bottom")
    rss = sorted(main, key=lambda r: r["m"])
    if rss:
        ax_r = ax_m.twinx()
        ax_r.plot([r["m"] for r in rss], [r["rss_peak_mb"] for r in rss], "^:", color="tab:green",
                  label="RSS peak, process (right axis)")
        ax_r.set_ylabel("RSS MB")
        ax_r.set_ylim(0, 1.5 * max(r["rss_peak_mb"] or 0 for r in rss) + 1)  # below the legends
        ax_r.ticklabel_format(axis="y", useOffset=False, style="plain")
        ax_r.legend(fontsize=7, loc="lower right")
    st = result["settings"]
    ax_t.set(xlabel=f"m (prompt length; r from the budget of l={st['pt_tokens']})",
             ylabel="step time, s (median, min-max)",
             title=f"{st['model']}, lengths={st['lengths']}, batch {st['batch_size']}")
    ax_m.set(xlabel="m", ylabel="step tensor peak MB", title="memory")
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------- scale


def run_scale(settings: dict) -> dict | None:
    """Build the backbone sharded under ZeRO-3 over the launched ranks, take a few DePT steps, report memory."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    from pipeline import distributed
    from pipeline.backbone import build_config, is_random, load_tokenizer
    from pipeline.data import collate
    from pipeline.dept import rank_for_budget
    from pipeline.train import (TrainConfig, build_model, count_params, load_ds_config, param_groups,
                                sharding_report, warmup_then_linear_decay)

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
        rows, info = _tokenized_rows(settings_rows, backbone, world)
        micro = settings["batch_size"] // world
        times, losses = [], []
        if not on_cpu:
            accel.reset_peak_memory_stats()
        for step in range(settings["warmup"] + settings["steps"]):
            sampler.label = "warm-up" if step < settings["warmup"] else "steps"
            first = (step * settings["batch_size"] + rank * micro) % max(len(rows) - micro, 1)
            batch = collate(rows[first:first + micro], backbone.tokenizer.pad_token_id, backbone.is_encoder_decoder, s)
            batch = {k: t.to(engine.device) for k, t in batch.items()}
            _sync()
            tick = time.perf_counter()
            out = engine(**batch)
            engine.backward(out.loss)
            engine.step()
            _sync()
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
        "mode": "scale", "settings": _jsonable(settings), "world_size": world,
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
    write_outputs(settings, result, plot_scale)
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
             "", f"{_count(result['backbone_params'])} backbone parameters (d={result['d_model']}, "
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
    ax.set(xlabel="s since start", ylabel="GB", title=f"{_count(result['backbone_params'])} params on "
           f"{result['world_size']} rank(s): memory over time")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ output


def write_outputs(settings: dict, result: dict, plot) -> None:
    """bench.md, bench.json, bench.png in the output directory; the table on stdout; MLflow when asked (rank 0)."""
    from pipeline import atomic

    out = Path(settings["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    text = compare_markdown(result) if result["mode"] == "compare" else scale_markdown(result)
    atomic.write_text(out / "bench.md", text)
    atomic.write_text(out / "bench.json", json.dumps(result, indent=1, default=str) + "\n")
    plot(result, out / "bench.png")
    print(text, flush=True)
    print(f"wrote {out / 'bench.md'}, {out / 'bench.json'}, {out / 'bench.png'}", flush=True)


def _metrics(result: dict) -> dict[str, float]:
    metrics: dict[str, float] = {}

    def put(name, value):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            metrics[name] = float(value)

    if result["mode"] == "compare":
        for row in result["rows"]:
            for col in ("step_s", "step_min_s", "step_max_s", "tokens_per_s", "step_tensor_peak_mb", "rss_peak_mb",
                        "infer_s", "epoch_s", "enc_tokens"):
                put(f"{row['key']}.{col}", row[col])
            for col in ("x_pt", "x_bare_same_len"):
                if row[col]:
                    put(f"{row['key']}.{col}", row[col]["median"])
        for target in result["targets"]:
            if target["value"]:
                put(f"target.{target['key']}", target["value"]["median"])
    else:
        for key in ("load_s", "engine_init_s", "step_s", "tokens_per_s", "backbone_params", "peak_used_mb",
                    "headroom_mb", "total_ram_mb"):
            put(key, result[key])
        for r in result["ranks"]:
            put(f"rank{r['rank']}.held_param_bytes", r["held_param_bytes"])
            put(f"rank{r['rank']}.ru_maxrss_mb", r["ru_maxrss_mb"])
    return metrics


def track(settings: dict, result: dict | None) -> None:
    """Log the run to MLflow (when --mlflow_uri is set) through `pipeline.tracking.Tracker`: one run with the
    settings as params, every number as a metric, each target's verdict as a tag, bench.md/json/png as artifacts.

    Called on every rank (opening the run is a collective under several ranks); only rank 0, which holds
    `result`, logs."""
    if not settings.get("mlflow_uri"):
        return
    import hashlib

    from pipeline.tracking import Tracker

    digest = hashlib.sha1(json.dumps(_jsonable(settings), sort_keys=True, default=str).encode()).hexdigest()[:10]
    key = f"bench.{settings['mode']}.{digest}.{time.time_ns()}"  # a new run per measurement (rank 0's key counts)
    name = f"bench-{settings['mode']}-{settings['model'].replace(':', '-')}"
    with Tracker(settings["mlflow_uri"], settings["experiment"]) as tracker:
        run_id = tracker.parent(name, key)
        if result is None:
            return
        params = {k: v for k, v in _jsonable(settings).items() if k != "mlflow_uri" and v not in (None, "")}
        tracker.log_params(params, run_id)
        tracker.set_tags({"dept.bench": result["mode"]}, run_id)
        tracker.log_metrics(_metrics(result), step=0, run_id=run_id)
        for target in result.get("targets", []):
            tracker.set_tags({f"target.{target['key']}": f"{target['name']}: {fmt_ratio(target['value'])} vs "
                                                          f"{target['target']} ({target['verdict']})"}, run_id)
        out = Path(settings["output_dir"])
        for file in ("bench.md", "bench.json", "bench.png"):
            tracker.log_artifact(out / file, run_id=run_id)
        tracker.finish(run_id)
        log.info("logged to MLflow run %s at %s (experiment %s)", run_id, tracker.uri, settings["experiment"])
