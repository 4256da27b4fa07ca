"""Adapters in other formats: the DePT authors' released checkpoints in, PEFT prompt tuning out.

Authors' format (their PEFT fork, `peft_type` PROMPT_TUNING_LORA): `adapter_config.json` + `adapter_model.bin`, a
plain torch state dict whose tensors map onto ours as

    prompt_embeddings                [m, d]  -> prompt
    prompt_encoder.lora_embedding_A  [s, r]  -> lora_A
    prompt_encoder.lora_embedding_B  [r, d]  -> lora_B

with m = num_virtual_tokens, s = max_length, d = token_dim and scale lora_alpha / sqrt(r), as in our module.
PEFT format (PROMPT_TUNING, encoder-only prompt): `adapter_config.json` + `adapter_model.safetensors` holding
`prompt_embeddings` [m, d]. PEFT has no DePT type, so only adapters without an offset can be exported.

Module-level imports stay light (the CLI imports this module to list its commands); torch and friends are
imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import PipelineError

if TYPE_CHECKING:
    from torch import Tensor

    from pipeline.dept import DeptConfig

CONFIG_NAME = "adapter_config.json"
AUTHORS_PEFT_TYPE = "PROMPT_TUNING_LORA"
AUTHORS_WEIGHTS = "adapter_model.bin"
PEFT_WEIGHTS = "adapter_model.safetensors"
# Source tensor name -> our name.
TENSOR_NAMES = {
    "prompt_embeddings": "prompt",
    "prompt_encoder.lora_embedding_A": "lora_A",
    "prompt_encoder.lora_embedding_B": "lora_B",
}
SOURCE_NAMES = {ours: theirs for theirs, ours in TENSOR_NAMES.items()}
# PEFT spells vocabulary sampling SAMPLE_VOCAB; we spell it VOCAB.
INIT_NAMES = {"TEXT": "TEXT", "RANDOM": "RANDOM", "SAMPLE_VOCAB": "VOCAB", "VOCAB": "VOCAB"}
# Seed of the A that stands in for a missing one, so importing the same file twice gives the same bytes.
MISSING_A_SEED = 0
# Files an output directory may already hold: it is then an adapter that an import/export may replace.
REPLACEABLE_FILES = {CONFIG_NAME, AUTHORS_WEIGHTS, PEFT_WEIGHTS, "README.md"}
# The source config keys that set each tensor's shape, named in shape refusals.
SHAPE_WORDS = {
    "prompt": ("num_virtual_tokens", "token_dim"),
    "lora_A": ("max_length", "r"),
    "lora_B": ("r", "token_dim"),
}


# --------------------------------------------------------------------------------------------------- import


def is_peft_style_dir(path: str | Path) -> bool:
    """True for a directory whose adapter_config.json names a `peft_type` (PEFT or the authors' fork), i.e. one
    that is not in this pipeline's format."""
    config_file = Path(path) / CONFIG_NAME
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return False  # absent or broken: the native reader gives the precise message
    return isinstance(raw, dict) and "peft_type" in raw and "format_version" not in raw


def read_any_adapter(path: str | Path) -> tuple[DeptConfig, dict[str, Tensor], dict]:
    """An adapter in this pipeline's format, or one of the DePT authors' released adapters imported on the fly
    (one lacking A/B is refused): (config, tensors, meta) as `adapters.read_adapter` returns them."""
    from pipeline import adapters, lora

    if lora.is_lora_adapter(path):
        raise PipelineError(
            f"{path} is a LoRA adapter (PEFT): it starts or serves method lora only, not a DePT or prompt tuning job"
        )
    if is_peft_style_dir(path):
        return import_authors_adapter(path)
    return adapters.read_adapter(path)


def import_authors_adapter(
    src_dir: str | Path, out_dir: str | Path | None = None, allow_missing_lowrank: bool = False
) -> tuple[DeptConfig, dict[str, Tensor], dict]:
    """Read an adapter released by the DePT authors; with `out_dir`, also write it in our format (atomically).

    Returns (config, tensors, meta) like `adapters.read_adapter`: tensors `prompt` [m, d], `lora_A` [s, r],
    `lora_B` [r, d], float32. A file without A/B (the released wic, nq, hotpotqa) is refused unless
    `allow_missing_lowrank`: then B = 0, so A @ B = 0 exactly and the adapter computes prompt tuning with m tokens,
    while r stays as configured so the adapter still fits a DePT run (see `_stand_in_lowrank` for A).
    """
    src = Path(src_dir)
    raw = _read_authors_config(src)
    config = _config_from_authors(raw, src)
    weights = src / AUTHORS_WEIGHTS
    state = _load_state_dict(weights)
    tensors, missing = _rename_and_check(state, config, src, allow_missing_lowrank)
    extra = {
        "imported_from": str(src.resolve()),
        "source_peft_type": raw["peft_type"],
        "source_task_type": raw.get("task_type"),
        "source_prompt_init": raw.get("prompt_tuning_init"),
        "source_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
        "lowrank_missing": bool(missing),
    }
    if missing:
        extra.update(
            lowrank_missing_tensors=missing,
            lowrank_stand_in=f"A kaiming_uniform(a=sqrt(5), seed={MISSING_A_SEED}) where absent, B = 0",
        )
    backbone = str(raw.get("base_model_name_or_path") or "")
    if out_dir is None:
        meta = {
            "method": "dept" if config.r > 0 else "pt",
            **config.to_dict(),
            "scale": config.scale,
            "backbone": backbone,
            **extra,
        }
        return config, tensors, meta
    return _write_ours(tensors, config, Path(out_dir), src, backbone, extra)


def _write_ours(tensors, config, out: Path, src: Path, backbone: str, extra: dict):
    from pipeline import adapters

    _check_out_dir(out, src)
    adapters.write_adapter(tensors, config, out, backbone, extra)
    return adapters.read_adapter(out)  # read back: verifies the checksum and shapes of what was written


def _read_authors_config(src: Path) -> dict:
    """The source adapter_config.json as a dict, refusing anything that is not a DePT adapter directory."""
    if not src.is_dir():
        raise PipelineError(
            f"adapter {src} does not exist or is not a directory: pass the directory holding "
            f"{CONFIG_NAME} and {AUTHORS_WEIGHTS}"
        )
    config_file = src / CONFIG_NAME
    if not config_file.is_file():
        raise PipelineError(f"{src} is not a DePT adapter: it has no {CONFIG_NAME}")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"{config_file} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(raw, dict):
        raise PipelineError(f"{config_file} is not a JSON object: not an adapter config")
    if raw.get("peft_type") != AUTHORS_PEFT_TYPE:
        raise PipelineError(
            f"{src} is a {raw.get('peft_type')!r} adapter, not a DePT one (peft_type "
            f"{AUTHORS_PEFT_TYPE}): only the DePT authors' adapters can be imported"
        )
    if not (src / AUTHORS_WEIGHTS).is_file():
        raise PipelineError(f"{src} has no {AUTHORS_WEIGHTS}: copy the weights file next to {CONFIG_NAME}")
    return raw


def _config_from_authors(raw: dict, src: Path) -> DeptConfig:
    """Map the authors' config keys onto DeptConfig (num_virtual_tokens->m, max_length->s, token_dim->d)."""
    from pipeline.dept import DEFAULT_INIT_TEXT, DeptConfig

    if raw.get("num_transformer_submodules", 1) not in (1, None):
        raise PipelineError(
            f"{src} prompts {raw['num_transformer_submodules']} transformer submodules (encoder and "
            "decoder); DePT here prompts the encoder only (num_transformer_submodules 1)"
        )
    if raw.get("token_dim") is None and raw.get("hidden_size") is not None:
        raw = {**raw, "token_dim": raw["hidden_size"]}  # older configs name d only hidden_size
    lacking = [key for key in ("num_virtual_tokens", "r", "max_length", "lora_alpha", "token_dim") if key not in raw]
    if lacking:
        raise PipelineError(f"{src / CONFIG_NAME} lacks {', '.join(lacking)}: not a complete DePT adapter config")
    try:
        return DeptConfig(
            num_virtual_tokens=raw["num_virtual_tokens"],
            r=raw["r"],
            max_length=raw["max_length"],
            d_model=raw["token_dim"],
            lora_alpha=float(raw["lora_alpha"]),
            # The init is history for a trained adapter; an unknown name must not block the import.
            prompt_init=INIT_NAMES.get(str(raw.get("prompt_tuning_init")).upper(), "RANDOM"),
            init_text=raw.get("prompt_tuning_init_text") or DEFAULT_INIT_TEXT,
        )
    except (PipelineError, TypeError, ValueError) as err:
        raise PipelineError(f"{src / CONFIG_NAME}: {err}") from None


def _load_state_dict(weights: Path) -> dict:
    """torch.load with weights_only=True (never runs pickled code), turning every failure into one line."""
    import pickle

    import torch

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise PipelineError(f"{weights} cannot be read: truncated or corrupt ({_first_line(err)})") from None
        raise PipelineError(
            f"{weights} is not a plain state dict: it pickles Python objects{_global_named(err)} "
            "that weights_only loading refuses to run; re-save it as a dict of tensors"
        ) from None
    # A truncated or garbled file surfaces as RuntimeError (zip), EOFError, KeyError, ... depending on where it
    # breaks; none of them is a bug of ours, so all become the same refusal.
    except Exception as err:  # noqa: BLE001
        raise PipelineError(
            f"{weights} cannot be read: truncated or corrupt ({type(err).__name__}: {_first_line(err)})"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise PipelineError(f"{weights} holds a {type(state).__name__}, not a state dict (a dict of named tensors)")
    return state


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:160] if text else "no detail"


def _global_named(err: Exception) -> str:
    """' (e.g. mymodule.MyClass)' when torch names the refused global, else ''."""
    import re

    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(err))
    return f" ({found.group(1)})" if found else ""


def _rename_and_check(state: dict, config: DeptConfig, src: Path, allow_missing_lowrank: bool):
    """Our-named float32 tensors checked against the config, plus the source names of missing A/B (or [])."""
    from pipeline.adapters import expected_shapes

    unknown = sorted(set(state) - set(TENSOR_NAMES))
    if unknown:
        raise PipelineError(
            f"{src / AUTHORS_WEIGHTS} holds tensors {unknown} that a DePT adapter does not have "
            f"(expected {sorted(TENSOR_NAMES)})"
        )
    expected = expected_shapes(config)
    surplus = sorted(theirs for theirs, ours in TENSOR_NAMES.items() if theirs in state and ours not in expected)
    if surplus:
        raise PipelineError(
            f"{src / AUTHORS_WEIGHTS} holds {surplus} but {CONFIG_NAME} says r={config.r}: fix r in the config"
        )
    if "prompt_embeddings" not in state and config.num_virtual_tokens > 0:
        raise PipelineError(
            f"{src / AUTHORS_WEIGHTS} lacks prompt_embeddings although {CONFIG_NAME} says "
            f"num_virtual_tokens={config.num_virtual_tokens}: the adapter is incomplete"
        )
    missing = [
        SOURCE_NAMES[ours] for ours in ("lora_A", "lora_B") if ours in expected and SOURCE_NAMES[ours] not in state
    ]
    if missing and not allow_missing_lowrank:
        raise PipelineError(
            f"{src / AUTHORS_WEIGHTS} lacks {' and '.join(missing)} although {CONFIG_NAME} says "
            f"r={config.r}: `dept import-adapter {src} OUT_DIR --allow_missing_lowrank` imports it as "
            f"prompt tuning with m={config.num_virtual_tokens} tokens (zero offset, B = 0)"
        )
    tensors = {}
    for ours, shape in expected.items():
        theirs = SOURCE_NAMES[ours]
        if theirs in state:
            tensors[ours] = _checked(state[theirs], theirs, ours, shape, config, src)
    if missing:
        tensors.update(_stand_in_lowrank(config, tensors.get("lora_A")))
    return tensors, missing


def _checked(tensor, theirs: str, ours: str, shape: tuple[int, ...], config: DeptConfig, src: Path):
    import torch

    raw_values = {
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": config.d_model,
        "max_length": config.max_length,
        "r": config.r,
    }
    if tuple(tensor.shape) != shape:
        said = ", ".join(f"{key}={raw_values[key]}" for key in SHAPE_WORDS[ours])
        raise PipelineError(
            f"{src / AUTHORS_WEIGHTS}: tensor {theirs} has shape {list(tensor.shape)} but "
            f"{CONFIG_NAME} says {said} (expected {list(shape)})"
        )
    if not tensor.is_floating_point():
        raise PipelineError(f"{src / AUTHORS_WEIGHTS}: tensor {theirs} has dtype {tensor.dtype}, not floating point")
    if not torch.isfinite(tensor).all():
        raise PipelineError(f"{src / AUTHORS_WEIGHTS}: tensor {theirs} holds NaN/inf values; the adapter is unusable")
    return tensor.detach().float().contiguous()


def _stand_in_lowrank(config: DeptConfig, lora_a: Tensor | None) -> dict[str, Tensor]:
    """A [s, r] and B [r, d] with A @ B exactly 0 for a file that lacks (one of) them.

    B = 0 is what makes the product exactly zero (each entry is a sum of x * 0.0). A keeps the file's values if
    present, else DePT's own init, kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(r), 1/sqrt(r)), seeded: with A = 0 as
    well, both gradients (dL/dA = G B^T, dL/dB = A^T G) would stay 0 and a run starting from this adapter could
    never train the offset; with this A it trains exactly like a fresh DePT adapter.
    """
    import torch
    from torch import nn

    s, r, d = config.max_length, config.r, config.d_model
    if lora_a is None:
        lora_a = torch.empty(s, r)
        nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5), generator=torch.Generator().manual_seed(MISSING_A_SEED))
    return {"lora_A": lora_a, "lora_B": torch.zeros(r, d)}


def _check_out_dir(out: Path, src: Path) -> None:
    """Refuse an output that would destroy something: the writers replace the whole directory."""
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise PipelineError(f"output directory {out} is the source adapter itself: choose another output directory")
    if out.exists() and not out.is_dir():
        raise PipelineError(f"output {out} exists and is a file: choose a directory path")
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in REPLACEABLE_FILES)
        if others:
            raise PipelineError(
                f"output directory {out} exists and holds other files ({', '.join(others[:3])}); "
                "it would be replaced whole: choose a new directory"
            )


# --------------------------------------------------------------------------------------------------- export


def export_peft(adapter_dir: str | Path, out_dir: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write a prompt tuning adapter (r = 0, or an offset that is exactly zero) as a PEFT PROMPT_TUNING directory.

    PEFT loads it with `PeftModel.from_pretrained(base_model, out_dir)`: prompt on the encoder only
    (num_transformer_submodules 1), task type SEQ_2_SEQ_LM for encoder-decoder backbones and CAUSAL_LM otherwise,
    decided from `base_model_name_or_path` or else the backbone recorded in the adapter. Weights: `prompt_embeddings`
    [m, d] in adapter_model.safetensors. Returns the output directory.
    """
    from pipeline import atomic

    config, tensors, meta = read_any_adapter(adapter_dir)
    prompt = _pt_prompt(config, tensors, str(adapter_dir))
    base = base_model_name_or_path or meta.get("backbone") or ""
    if not base:
        raise PipelineError(
            f"adapter {adapter_dir} records no backbone: pass --base_model (the model it was "
            "trained on) so the export can set PEFT's task type"
        )
    peft_config = _peft_config(config, base, _task_type_for(base, meta, explicit=bool(base_model_name_or_path)))
    out = Path(out_dir)
    _check_out_dir(out, Path(adapter_dir))
    with atomic.replace_dir(out) as tmp:
        atomic.save_tensors({"prompt_embeddings": prompt}, tmp / PEFT_WEIGHTS, metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return out


def _pt_prompt(config: DeptConfig, tensors: dict, where: str):
    """The prompt [m, d] of an adapter PEFT can represent, refusing a DePT adapter with a non-zero offset."""
    if config.r > 0 and bool((tensors["lora_A"] @ tensors["lora_B"]).any()):
        raise PipelineError(
            f"adapter {where} is DePT (r={config.r}, non-zero offset A @ B): PEFT has no DePT type, "
            "only prompt tuning; train with --method pt to get an exportable adapter"
        )
    if config.num_virtual_tokens == 0:
        raise PipelineError(f"adapter {where} has no prompt (m=0) and a zero offset: nothing to export")
    return tensors["prompt"].float()


def _task_type_for(base: str, meta: dict, explicit: bool) -> str:
    """An imported adapter records its source's task type: use it (no hub lookup) unless a base model is given."""
    recorded = meta.get("source_task_type")
    if not explicit and recorded in ("SEQ_2_SEQ_LM", "CAUSAL_LM"):
        return recorded
    return _peft_task_type(base)


def _peft_task_type(base: str) -> str:
    """SEQ_2_SEQ_LM for encoder-decoder backbones (T5), CAUSAL_LM for decoder-only ones (LLaMA)."""
    from pipeline.backbone import PRESETS, RANDOM_PREFIX

    if base.startswith(RANDOM_PREFIX):
        preset = PRESETS.get(base[len(RANDOM_PREFIX) :])
        if preset is None:
            raise PipelineError(f"unknown backbone {base!r}: pass --base_model as a model directory or hub name")
        return "SEQ_2_SEQ_LM" if preset["arch"] == "t5" else "CAUSAL_LM"
    from transformers import AutoConfig

    from pipeline.resources import model_location

    try:
        model_config = AutoConfig.from_pretrained(model_location(base))
    except (OSError, ValueError) as err:
        raise PipelineError(
            f"cannot read the config of base model {base!r} to tell encoder-decoder from decoder-only "
            f"({_first_line(err)[:120]}); pass --base_model as a model directory or hub name"
        ) from None
    return "SEQ_2_SEQ_LM" if model_config.is_encoder_decoder else "CAUSAL_LM"


def _peft_config(config: DeptConfig, base: str, task_type: str) -> dict:
    """PEFT 0.21's PromptTuningConfig fields (peft_version is left for PEFT to fill on load)."""
    from pipeline.backbone import RANDOM_PREFIX

    return {
        "peft_type": "PROMPT_TUNING",
        "task_type": task_type,
        "num_virtual_tokens": config.num_virtual_tokens,
        "token_dim": config.d_model,
        "num_transformer_submodules": 1,  # encoder only, as DePT/PT here; PEFT's seq2seq default would be 2
        "num_attention_heads": None,  # PEFT reads these two from the base model's config
        "num_layers": None,
        # RANDOM, not TEXT: the trained weights replace any init, and TEXT would make PEFT fetch a tokenizer
        # whenever the adapter is loaded trainable.
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None,
        "inference_mode": True,
        # A random:<preset> name is nothing from_pretrained could resolve.
        "base_model_name_or_path": None if base.startswith(RANDOM_PREFIX) else base,
        "revision": None,
        "auto_mapping": None,
        "modules_to_save": None,
    }
