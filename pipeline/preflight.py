"""Checks a job passes before anything is loaded or written: what would otherwise fail minutes or hours in.

The DeepSpeed config exists and parses as a name or path, a local model path exists, an init adapter's shape does
not contradict explicit values, the data can supply the job (tasks, files, k-shot sizes), and the global batch
splits over the ranks. `dept train` runs it before touching the output directory; `dept run` (and `--dry_run`) for
every job of the plan. Nothing here imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline import distributed
from pipeline.config import JobConfig, micro_batch_size
from pipeline.errors import PipelineError
from pipeline.resources import MODEL_KINDS, ds_config_path, shipped_model_hint


def check_model(model: str) -> None:
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().exists():
        raise PipelineError(f"model path {model!r} does not exist{shipped_model_hint(model)}: pass {MODEL_KINDS}")


def check_init_adapter(cfg: JobConfig) -> None:
    """The init adapter exists, and explicit m, r, s agree with its shape (or s has a length policy)."""
    if not cfg.init_adapter:
        return
    folder = Path(cfg.init_adapter)
    config_file = folder / "adapter_config.json"
    if not config_file.is_file():
        raise PipelineError(
            f"init adapter {cfg.init_adapter} does not exist: pass a directory holding "
            "adapter_config.json (ours or the DePT authors')"
        )
    try:
        shape = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise PipelineError(f"adapter config {config_file} is not valid JSON ({err.msg}, line {err.lineno})") from None
    if (str(shape.get("peft_type", "")).upper() == "LORA") != (cfg.method == "lora"):
        kind = "a LoRA adapter" if cfg.method != "lora" else "not a LoRA adapter"
        raise PipelineError(
            f"init adapter {cfg.init_adapter} is {kind}: a {cfg.method} job starts from an adapter of its own method"
        )
    if cfg.method == "lora":
        return  # its r and target modules are checked against the job when the backbone is there (lora.resolve_shape)
    cfg.dept.refuse_other_shape(cfg.init_adapter, shape.get("num_virtual_tokens"), shape.get("r"))
    theirs = shape.get("max_length")
    if (
        cfg.dept.max_length not in (None, theirs)
        and theirs is not None
        and cfg.on_length_mismatch == "error"
        and shape.get("r", 0)
    ):
        raise PipelineError(
            f"init adapter {cfg.init_adapter} has max_length s={theirs} (rows of A) but "
            f"{cfg.dept.max_length} was given: drop max_length, or set on_length_mismatch to "
            "truncate or pad"
        )


def check_batch(cfg: JobConfig, world: int) -> None:
    micro_batch_size(cfg.train.batch_size, cfg.train.grad_accum, world)


def check_job(cfg: JobConfig, data: bool = True, model: bool = True, init_adapter: bool = True) -> None:
    """Every check above. `data=False` skips reading the task files (a recipe checks each distinct data section
    once); a model or init adapter that an earlier stage of a recipe makes is not checked (it does not exist yet)."""
    from pipeline.tasks.feasibility import check_job_data

    ds_config_path(cfg.ds_config)
    if model:
        check_model(cfg.model)
    if init_adapter:
        check_init_adapter(cfg)
    check_batch(cfg, distributed.world_size())
    if data:
        check_job_data(cfg.data, cfg.train.seed)
