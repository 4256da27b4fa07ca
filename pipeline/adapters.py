"""DePT adapters on disk: a directory with `adapter_config.json` and `adapter_model.safetensors`.

Tensors: `prompt` [m, d], `lora_A` [s, r], `lora_B` [r, d] (no lora tensors when r = 0, i.e. vanilla prompt
tuning). Under ZeRO-3 every rank joins the gather (a rank that skips it deadlocks the others, and a rank that
reads the partitioned tensor directly writes an empty file, a bug several libraries shipped); rank 0 writes.
The directory is replaced atomically and the config records the weights' SHA-256, so a half-written or
tampered adapter is refused on load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline import atomic
from pipeline.dept import DeptConfig, DePTPrompt
from pipeline.engine import gathered
from pipeline.errors import PipelineError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT_VERSION = 1


def adapter_tensors(prompt_module: DePTPrompt) -> dict[str, torch.Tensor]:
    """Full fp32 copies of the DePT tensors. Collective under ZeRO-3: call it on every rank."""
    named = {name: param for name, param in prompt_module.named_parameters() if param is not None}
    with gathered(list(named.values())):
        return {name: param.detach().float().clone().cpu() for name, param in named.items()}


def save_adapter(
    prompt_module: DePTPrompt, path: str | Path, backbone_name: str, rank: int = 0, extra: dict | None = None
) -> dict[str, torch.Tensor]:
    """Gather on every rank, write on rank 0 (atomically). Returns the gathered tensors."""
    tensors = adapter_tensors(prompt_module)
    if rank == 0:
        write_adapter(tensors, prompt_module.config, path, backbone_name, extra)
    return tensors


def write_adapter(
    tensors: dict[str, torch.Tensor],
    config: DeptConfig,
    path: str | Path,
    backbone_name: str,
    extra: dict | None = None,
) -> None:
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():
            raise PipelineError(f"refusing to write adapter {path}: tensor {name} holds NaN/inf values")
    with atomic.replace_dir(path) as tmp:
        atomic.save_tensors(tensors, tmp / WEIGHTS_NAME)
        digest = hashlib.sha256((tmp / WEIGHTS_NAME).read_bytes()).hexdigest()
        meta = {
            "format_version": FORMAT_VERSION,
            "method": "dept" if config.r > 0 else "pt",
            **config.to_dict(),
            "scale": config.scale,
            "backbone": backbone_name,
            "weights_sha256": digest,
            **(extra or {}),
        }
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_adapter(path: str | Path) -> tuple[DeptConfig, dict[str, torch.Tensor], dict]:
    """Read and verify an adapter directory of this pipeline: (config, tensors, raw json).
    `interop.read_any_adapter` also accepts the DePT authors' released format."""
    path = Path(path)
    atomic.recover_dir(path)
    config_file, weights_file = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not path.is_dir():
        raise PipelineError(f"adapter {path} does not exist: pass a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    if not config_file.exists() or not weights_file.exists():
        hint = (
            " (an authors' DePT adapter? convert it with `dept import-adapter`)"
            if (path / "adapter_model.bin").exists()
            else ""
        )
        raise PipelineError(f"adapter {path} lacks {CONFIG_NAME} or {WEIGHTS_NAME}{hint}")
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"adapter config {config_file} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise PipelineError(
            f"adapter {path} is not a dept-pipeline adapter (format_version {meta.get('format_version')!r})"
        )
    digest = hashlib.sha256(weights_file.read_bytes()).hexdigest()
    if meta.get("weights_sha256") != digest:
        raise PipelineError(
            f"adapter {path}: {WEIGHTS_NAME} does not match its recorded checksum (truncated or "
            "modified file); re-export or retrain the adapter"
        )
    fields = {k: meta[k] for k in DeptConfig.__dataclass_fields__ if k in meta}
    config = DeptConfig(**fields)
    tensors = load_file(str(weights_file))
    check_shapes(tensors, config, str(path))
    return config, tensors, meta


def expected_shapes(config: DeptConfig) -> dict[str, tuple[int, ...]]:
    m, r, s, d = config.num_virtual_tokens, config.r, config.max_length, config.d_model
    shapes = {"prompt": (m, d)} if m > 0 else {}
    if r > 0:
        shapes.update(lora_A=(s, r), lora_B=(r, d))
    return shapes


def check_shapes(tensors: dict[str, torch.Tensor], config: DeptConfig, where: str) -> None:
    expected = expected_shapes(config)
    if set(tensors) != set(expected):
        raise PipelineError(
            f"{where}: tensors {sorted(tensors)} but a m={config.num_virtual_tokens}, r={config.r} "
            f"adapter holds {sorted(expected)}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise PipelineError(f"{where}: {name} has shape {list(tensors[name].shape)}, config says {list(shape)}")


def check_fits(config: DeptConfig, d_model: int, max_length: int, where: str) -> None:
    """An adapter fits a backbone when d matches, and a run when its A has exactly s rows."""
    if config.d_model != d_model:
        raise PipelineError(
            f"adapter {where} has d_model {config.d_model} but the backbone's embeddings are "
            f"{d_model} wide: use an adapter trained on this backbone geometry"
        )
    if config.r > 0 and config.max_length != max_length:
        raise PipelineError(
            f"adapter {where} has max_length s={config.max_length} (rows of A) but this run uses "
            f"s={max_length}: set max_length to {config.max_length} or choose how to resize A"
        )


def load_into(prompt_module: DePTPrompt, tensors: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into a DePT module. Call before `deepspeed.initialize`: afterwards the optimizer's
    fp32 master copy would overwrite them."""
    check_shapes(tensors, prompt_module.config, "adapter")
    with torch.no_grad():
        for name, tensor in tensors.items():
            getattr(prompt_module, name).copy_(tensor)


def fit_length(
    config: DeptConfig, tensors: dict[str, torch.Tensor], max_length: int, policy: str, where: str
) -> tuple[DeptConfig, dict[str, torch.Tensor]]:
    """Adapt A [s, r] to a run with another max length: `error` (default), `truncate` (keep the first rows,
    when the new s is smaller) or `pad` (append zero rows, i.e. no offset for the new positions)."""
    import dataclasses

    if config.r == 0 or config.max_length == max_length:
        return config, tensors
    old = config.max_length
    if policy == "error":
        raise PipelineError(
            f"adapter {where} has max_length s={old} but this run uses s={max_length}: set "
            f"max_length to {old}, or on_length_mismatch to truncate/pad"
        )
    if policy == "truncate" and max_length > old:
        raise PipelineError(f"adapter {where}: cannot truncate A from s={old} to a longer s={max_length}; use pad")
    if policy == "pad" and max_length < old:
        raise PipelineError(f"adapter {where}: cannot pad A from s={old} to a shorter s={max_length}; use truncate")
    lora_a = tensors["lora_A"]
    if policy == "truncate":
        lora_a = lora_a[:max_length]
    else:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(max_length - old, lora_a.shape[1])])
    return dataclasses.replace(config, max_length=max_length), {**tensors, "lora_A": lora_a.contiguous()}
