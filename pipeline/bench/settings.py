"""`dept bench` settings: defaults per mode, the presets, and the checks on every flag."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.bench")

REPO = Path(__file__).resolve().parents[2]
DS_CONFIGS = REPO / "ds_configs"
REFS = ("bare", "eager", "peft", "padded")
LENGTHS = {"padded": "rte", "rte": "rte", "boolq": "boolq"}  # `padded` takes RTE rows (or synthetic ones) to s

# Values a preset sets; explicit flags win over a preset, a preset over the mode's defaults.
COMPARE_DEFAULTS = dict(model="random:t5-base", ms="0,20,40,60,80,100", pt_tokens=100, max_length=256, batch_size=8,
                        grad_accum=1, steps=5, warmup=1, lengths="padded", refs="bare,eager,peft,padded",
                        infer_tokens=2, infer_repeats=3, tokenizer="", ds_config=str(DS_CONFIGS / "zero3_cpu.json"))
SCALE_DEFAULTS = dict(model="random:llama-7b", ms="60", pt_tokens=100, max_length=64, batch_size=0, grad_accum=1,
                      steps=3, warmup=1, lengths="padded", refs="", infer_tokens=0, infer_repeats=0, tokenizer="",
                      ds_config=str(DS_CONFIGS / "zero3_cpu_bf16.json"))

# Batch 32 as 4 micro-batches of 8 (8 of 4 for t5-large): the activations of 32 x 356 tokens at once would take
# ~18 GB for T5-base in fp32 (scaled from T5-small's measured step peak), too close to a 24 GB machine's RAM.
PAPER = dict(mode="compare", model="random:t5-base", ms="0,20,40,60,80,100", pt_tokens=100, max_length=256,
             batch_size=32, grad_accum=4, steps=5, warmup=1, lengths="padded")
PRESETS: dict[str, dict] = {
    # The paper's efficiency setting: T5-base geometry, l = 100, s = 256, every input padded to s, batch 32.
    "paper": dict(PAPER),
    # Same budget, dynamic padding on real RTE / BoolQ lengths, with the padded PT row next to it.
    # Lengths counted by a 32k SentencePiece trained on the task data (T5's tokenizer is not reachable offline).
    "paper-rte": dict(PAPER, lengths="rte", tokenizer="data-32k"),
    "paper-boolq": dict(PAPER, lengths="boolq", tokenizer="data-32k"),
    # "DePT's advantage grows with model size": the same table on the other T5 geometries.
    "paper-t5-small": dict(PAPER, model="random:t5-small"),
    "paper-t5-large": dict(PAPER, model="random:t5-large", grad_accum=8),
    # Scale mode (run under ./launch.sh; bf16 on CPU). `scale-dev` is the small geometry for trying it out.
    "scale-dev": dict(mode="scale", model="random:llama-7b", hidden=256, layers=4, intermediate=688),
    "scale-llama-1b": dict(mode="scale", model="random:llama-1b"),
    "scale-llama-3b": dict(mode="scale", model="random:llama-7b", hidden=3200, layers=26, intermediate=8640),
    "scale-llama-7b": dict(mode="scale", model="random:llama-7b"),
}



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
    arch = arch_of(settings["model"])
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



def arch_of(model: str) -> str | None:
    from pipeline.backbone import PRESETS as GEOMETRIES
    from pipeline.backbone import RANDOM_PREFIX

    if model.startswith(RANDOM_PREFIX):
        preset = GEOMETRIES.get(model[len(RANDOM_PREFIX):])
        return preset["arch"] if preset else None
    return None



def data_folder(data_dir: str) -> str | None:
    """--data_dir, else $DEPT_DATA_DIR, else ../shared/data beside the repository, else None (the hub)."""
    if data_dir:
        return data_dir
    if os.environ.get("DEPT_DATA_DIR"):
        return os.environ["DEPT_DATA_DIR"]
    shipped = REPO.parent / "shared" / "data"
    return str(shipped) if shipped.is_dir() else None
