"""Files shipped with the package: DeepSpeed configs, recipes and one small model, addressed by name or by path.

In a source checkout they are the repository's top-level `ds_configs/` and `recipes/`; the wheel installs the same
files inside the package (`pipeline/ds_configs`, `pipeline/recipes`, see pyproject.toml), so `--ds_config zero3_cpu`
and `dept run quickstart` work from any working directory. Nothing here imports torch.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.errors import PipelineError, did_you_mean

PACKAGE = Path(__file__).resolve().parent
GPU_CONFIG, CPU_CONFIG = "zero3_gpu", "zero3_cpu"


def _shipped_dir(name: str) -> Path:
    """`pipeline/<name>` in an installed wheel, `<repo>/<name>` in a source checkout (editable install)."""
    inside = PACKAGE / name
    return inside if inside.is_dir() else PACKAGE.parent / name


KINDS = {"ds_config": ("ds_configs", ".json"), "recipe": ("recipes", ".yaml")}


def shipped_names(kind: str) -> list[str]:
    """Names of the shipped files of a kind (`ds_config` or `recipe`)."""
    folder, suffix = KINDS[kind]
    return sorted(p.stem for p in _shipped_dir(folder).glob(f"*{suffix}"))


def _resolve(value: str, kind: str, base_dir: Path | None) -> Path:
    """A shipped name (`zero3_cpu`, `quickstart`) or a path (relative to `base_dir`, else the working directory).
    A path such as `ds_configs/zero3_cpu.json` that does not exist there names the shipped file (older recipes)."""
    folder, suffix = KINDS[kind]
    label = "DeepSpeed config" if kind == "ds_config" else "recipe"
    shipped = _shipped_dir(folder) / f"{value}{suffix}"
    looks_like_name = "/" not in value and not value.endswith(suffix)
    if looks_like_name and shipped.is_file():
        return shipped
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if path.is_file():
        return path.resolve()
    if path.parent.name == folder and (_shipped_dir(folder) / path.name).is_file():
        return _shipped_dir(folder) / path.name
    names = shipped_names(kind)
    hint = did_you_mean(Path(value).stem if value.endswith(suffix) else value, names)
    raise PipelineError(
        f"{label} {value!r}{hint} is neither a shipped {label} ({', '.join(names)}) nor an existing file"
        + (f" (looked for {path})" if not looks_like_name else "")
    )


def ds_config_path(value: str, base_dir: Path | None = None) -> Path:
    """`auto`, a shipped DeepSpeed config name, or a JSON path."""
    if value == "auto":
        value = default_ds_config()
    return _resolve(value, "ds_config", base_dir)


def recipe_path(value: str) -> Path:
    return _resolve(value, "recipe", None)


def gpu_visible() -> bool:
    """Whether this machine has an NVIDIA GPU, decided without importing torch (for `--dry_run` and the default
    DeepSpeed config): DS_ACCELERATOR=cpu forces no; otherwise the driver's device list."""
    if os.environ.get("DS_ACCELERATOR", "").lower() == "cpu":
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or (
        shutil.which("nvidia-smi") is not None and Path("/dev/nvidia0").exists()
    )


def default_ds_config() -> str:
    """The shipped config `auto` stands for: fp32 ZeRO-3 on GPUs (the paper's precision), the CPU one otherwise."""
    return GPU_CONFIG if gpu_visible() else CPU_CONFIG


SHIPPED_MODELS = ("stories260K",)  # pipeline/models/<name>: a real pretrained model small enough to ship (quickstart)
MODEL_KINDS = "a hub name, a local model directory, a shipped model (stories260K) or random:<preset>"


def shipped_model_hint(model: str) -> str:
    """What a model string that did not load may have meant: a shipped model's name, spelt differently."""
    return did_you_mean(Path(model).name, SHIPPED_MODELS)


def model_location(model: str) -> str:
    """A shipped model's directory for its name (`stories260K`); any other model string unchanged."""
    if model in SHIPPED_MODELS:
        return str(PACKAGE / "models" / model)
    return model
