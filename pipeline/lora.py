"""LoRA (Hu et al., 2021) as a baseline in the same recipe as DePT: HF PEFT's LoRA on the frozen, ZeRO-3-sharded
backbone, adapters in PEFT's own format.

    dept train --method lora --model stories260K --task stories-animal --output_dir runs/lora --lora_r 2
    PeftModel.from_pretrained(base_model, "runs/lora/best_adapter")       # no code of ours needed to load it

Why PEFT and not a LoRA of our own: PEFT is the reference implementation users compare against, kept up with
transformers' model classes (target-module defaults per architecture, T5 and LLaMA alike), and its adapters load in
every tool that reads PEFT; ours would be one more LoRA to trust and to keep working.

Under ZeRO-3 (facts checked in PEFT 0.21 and DeepSpeed 0.19, pinned in constraints.txt):
  - PEFT builds each LoRA pair from the base Linear's `in_features`/`out_features` attributes (and `ds_shape` where it
    reads a weight's shape), so a partitioned base layer (a 0-element `weight` outside its forward) is fine; the
    plain init draws A (kaiming) and zeroes B without reading the base weight (PiSSA-style inits gather it).
  - The new A and B are ordinary tensors on a partitioned model: `deepspeed.initialize` converts every parameter
    that is not yet partitioned (`_convert_to_zero_parameters`), broadcasting rank 0's values first, exactly as it
    does for the DePT module. Every rank still draws the same init (seeded), so nothing depends on that broadcast.
  - In the forward, `lora.Linear` calls its base layer and `lora_A`/`lora_B` as modules: ZeRO-3's per-module hooks
    gather each one for its own call. Reading A/B anywhere else (saving) happens inside `engine.gathered`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from pipeline import atomic
from pipeline.config import LoraArgs
from pipeline.engine import full_numel, gathered
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

DEFAULT_R = 8  # PEFT's LoraConfig default
ADAPTER_NAME = "default"  # PEFT's; it is dropped from the keys of a saved adapter
CONFIG_NAME = "adapter_config.json"  # PEFT's files
WEIGHTS_NAME = "adapter_model.safetensors"
META_NAME = "dept_adapter.json"  # ours, beside PEFT's files: input length, backbone, checksum, step


@dataclass
class LoraShape:
    """The resolved LoRA of a job: what PEFT's LoraConfig gets, and the counts it spends."""

    r: int
    alpha: float
    dropout: float
    target_modules: list[str]
    max_length: int  # s: the longest input in tokens (tokenization, as for every method)
    d_model: int
    trainable: int  # r x (the sum of in + out features over the targeted layers)
    per_rank: int  # parameters one unit of rank costs
    targeted_layers: int
    budget: int | None = None  # the parameter budget r was chosen for
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def default_targets(model: nn.Module) -> list[str]:
    """PEFT's target modules for the architecture (T5: q, v; LLaMA: q_proj, v_proj)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULTS:
        raise PipelineError(
            f"PEFT has no default LoRA target modules for model type {model_type!r}: name them with "
            "--lora_targets (recipe lora.target_modules), e.g. q_proj,v_proj"
        )
    return list(DEFAULTS[model_type])


def targeted_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """The Linear layers a list of target names selects, by PEFT's rule for a list (the module's name, or its
    dotted suffix). Reads `in_features`/`out_features`, never a (possibly partitioned) weight."""
    found = {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and any(name == t or name.endswith(f".{t}") for t in targets)
    }
    if not found:
        raise PipelineError(
            f"LoRA target_modules {targets} match no Linear layer of this backbone: name its attention or MLP "
            "layers (T5: q, k, v, o, wi, wo; LLaMA: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
        )
    return found


def rank_for_budget(budget: int, per_rank: int) -> int:
    """The rank whose parameter count r x per_rank comes nearest `budget` (at least 1)."""
    return max(1, round(budget / per_rank))


def resolve_shape(args: LoraArgs, model: nn.Module, d_model: int, max_length: int, init: dict | None) -> LoraShape:
    """r, alpha, dropout and targets of a job: explicit values, else the init adapter's, else a budget's r, else the
    defaults (r 8, alpha = r, PEFT's targets for the architecture). An explicit value contradicting the init adapter
    is refused (its tensors could not be loaded)."""
    notes = []
    r, alpha, targets = args.r, args.alpha, args.target_modules
    if init is not None:
        theirs = {"lora_r": init["r"], "lora_targets": sorted(init["target_modules"])}
        for flag, mine in (("lora_r", r), ("lora_targets", sorted(targets) if targets else None)):
            if mine is not None and mine != theirs[flag]:
                raise PipelineError(
                    f"init adapter has {flag}={theirs[flag]} but {mine} was given: drop {flag} to take the adapter's"
                )
        r, targets = init["r"], list(init["target_modules"])
        alpha = init["lora_alpha"] if alpha is None else alpha
        notes.append(f"LoRA shape from the init adapter: r={r}, targets {','.join(targets)}")
    targets = list(targets) if targets else default_targets(model)
    layers = targeted_linears(model, targets)
    per_rank = sum(m.in_features + m.out_features for m in layers.values())
    budget = None
    if r is None and (args.budget_tokens or args.budget_params):
        budget = args.budget_params or args.budget_tokens * d_model
        r = rank_for_budget(budget, per_rank)
        what = f"prompt tuning with l={args.budget_tokens} tokens" if args.budget_tokens else "the given budget"
        notes.append(
            f"LoRA rank {r} for {what} ({budget:,} parameters): {r} x {per_rank:,} = {r * per_rank:,} parameters "
            f"({len(layers)} layers: {','.join(targets)})"
        )
    r = DEFAULT_R if r is None else r
    return LoraShape(
        r=r,
        alpha=float(r if alpha is None else alpha),
        dropout=args.dropout,
        target_modules=targets,
        max_length=max_length,
        d_model=d_model,
        trainable=r * per_rank,
        per_rank=per_rank,
        targeted_layers=len(layers),
        budget=budget,
        notes=notes,
    )


def peft_config(shape: LoraShape, is_encoder_decoder: bool):
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=shape.r,
        lora_alpha=shape.alpha,
        lora_dropout=shape.dropout,
        target_modules=list(shape.target_modules),
        bias="none",
        task_type=TaskType.SEQ_2_SEQ_LM if is_encoder_decoder else TaskType.CAUSAL_LM,
    )  # base_model_name_or_path: PEFT records the directory the backbone was loaded from


def attach(model: nn.Module, shape: LoraShape, is_encoder_decoder: bool, seed: int):
    """`model` with LoRA pairs on its target layers (changed in place), wrapped as a PEFT model. A is drawn with
    `seed` (the same on every rank), B = 0: the model starts exactly as the frozen backbone."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, peft_config(shape, is_encoder_decoder))
    trainable = sum(full_numel(p) for p in peft_model.parameters() if p.requires_grad)
    if trainable != shape.trainable:  # our count and PEFT's matching disagree: say so rather than mislabel a budget
        raise PipelineError(
            f"LoRA on {shape.target_modules}: PEFT made {trainable:,} trainable parameters where "
            f"{shape.trainable:,} were counted; name the target modules exactly"
        )
    return peft_model


def inject(model: nn.Module, shape: LoraShape, seed: int) -> None:
    """LoRA pairs on `model`'s target layers, in place, without PEFT's model wrapper (`dept bench`'s LoRA row)."""
    from peft import inject_adapter_in_model

    torch.manual_seed(seed)
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    inject_adapter_in_model(peft_config(shape, is_encoder_decoder), model)


def set_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every LoRA pair of `model` on or off (PEFT's `enable_adapters`; off: the base layers alone)."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.enable_adapters(enabled)


# ----------------------------------------------------------------------------------------------- adapters on disk


def is_lora_adapter(path: str | Path) -> bool:
    """A directory holding a PEFT LoRA adapter (ours or anyone's)."""
    try:
        raw = json.loads((Path(path) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and str(raw.get("peft_type", "")).upper() == "LORA"


def peft_key(param_name: str) -> str:
    """A LoRA parameter's name in a PEFT model -> its key in PEFT's adapter file (PEFT drops `.<adapter name>`:
    `base_model.model.x.q.lora_A.default.weight` -> `base_model.model.x.q.lora_A.weight`)."""
    return param_name.replace(f".{ADAPTER_NAME}.", ".")


def adapter_tensors(peft_model: nn.Module) -> dict[str, torch.Tensor]:
    """Full fp32 copies of the LoRA tensors, keyed as in PEFT's adapter file. Collective under ZeRO-3."""
    named = {name: p for name, p in peft_model.named_parameters() if "lora_" in name}
    with gathered(list(named.values())):
        return {peft_key(name): p.detach().float().clone().cpu() for name, p in named.items()}


def save_adapter(
    peft_model: nn.Module, path: str | Path, shape: LoraShape, backbone_name: str, rank: int, extra: dict | None = None
) -> None:
    """Gather on every rank; rank 0 writes PEFT's `adapter_config.json` + `adapter_model.safetensors` (what
    `PeftModel.from_pretrained` reads) and our `dept_adapter.json`, atomically."""
    tensors = adapter_tensors(peft_model)
    if rank != 0:
        return
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise PipelineError(f"refusing to write adapter {path}: tensor {name} holds NaN/inf values")
    with atomic.replace_dir(path) as tmp:
        atomic.save_tensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        peft_model.peft_config[ADAPTER_NAME].save_pretrained(str(tmp))
        meta = {
            "method": "lora",
            "backbone": backbone_name,
            "max_length": shape.max_length,
            "d_model": shape.d_model,
            "r": shape.r,
            "trainable": shape.trainable,
            "weights_sha256": hashlib.sha256((tmp / WEIGHTS_NAME).read_bytes()).hexdigest(),
            **(extra or {}),
        }
        (tmp / META_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


@dataclass
class LoraAdapter:
    """A LoRA adapter read from disk: PEFT's config as a dict, its tensors (PEFT's keys), and ours."""

    path: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    meta: dict

    @property
    def max_length(self) -> int:
        """s the adapter was trained with (a PEFT adapter from elsewhere: our default)."""
        from pipeline.config import DEFAULT_S

        return int(self.meta.get("max_length") or DEFAULT_S)


def read_adapter(path: str | Path) -> LoraAdapter:
    """Read and verify a LoRA adapter directory (a checksum mismatch with our metadata is refused)."""
    from safetensors.torch import load_file

    path = Path(path)
    atomic.recover_dir(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        hint = " (adapter_model.bin: re-save it with safetensors)" if (path / "adapter_model.bin").exists() else ""
        raise PipelineError(f"LoRA adapter {path} lacks {WEIGHTS_NAME}{hint}")
    config = json.loads((path / CONFIG_NAME).read_text())
    meta = {}
    if (path / META_NAME).is_file():
        meta = json.loads((path / META_NAME).read_text())
        if meta.get("weights_sha256") != hashlib.sha256(weights.read_bytes()).hexdigest():
            raise PipelineError(
                f"LoRA adapter {path}: {WEIGHTS_NAME} does not match its recorded checksum (truncated or modified "
                "file); retrain or re-save the adapter"
            )
    return LoraAdapter(path, config, load_file(str(weights)), meta)


def load_into(peft_model: nn.Module, adapter: LoraAdapter) -> None:
    """Copy an adapter's tensors into a PEFT model's LoRA pairs of the same shape. Call before
    `deepspeed.initialize` (afterwards the optimizer's fp32 master copy would win)."""
    own = {peft_key(name): p for name, p in peft_model.named_parameters() if "lora_" in name}
    if set(own) != set(adapter.tensors):
        missing = sorted(set(own) - set(adapter.tensors))[:2] or sorted(set(adapter.tensors) - set(own))[:2]
        raise PipelineError(
            f"LoRA adapter {adapter.path} does not fit this backbone and targets (e.g. {missing}): use an adapter "
            "trained on this backbone with the same target modules"
        )
    with torch.no_grad():
        for key, param in own.items():
            if tuple(adapter.tensors[key].shape) != tuple(param.shape):
                raise PipelineError(
                    f"LoRA adapter {adapter.path}: {key} has shape {list(adapter.tensors[key].shape)}, this model "
                    f"{list(param.shape)}"
                )
            param.copy_(adapter.tensors[key].to(param.dtype))


def as_param_names(tensors: dict[str, torch.Tensor], peft_model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """Adapter-file keys -> the names of the live parameters (`prefix` + PEFT model name), e.g. to put the best
    adapter back into a training engine (`engine.Engine.overwrite`)."""
    names = {peft_key(name): name for name, _ in peft_model.named_parameters() if "lora_" in name}
    unknown = sorted(set(tensors) - set(names))
    if unknown:
        raise PipelineError(f"adapter tensor {unknown[0]} is not a LoRA parameter of this model")
    return {prefix + names[key]: tensor for key, tensor in tensors.items()}


def load_peft_model(base_model: nn.Module, path: str | Path):
    """What a user does with our adapter: `PeftModel.from_pretrained(base_model, path)` (inference mode)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base_model, str(path))
