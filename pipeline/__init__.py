"""dept-pipeline: Decomposed Prompt Tuning (DePT) on DeepSpeed ZeRO-3 sharded frozen T5/LLaMA backbones.

    from pipeline import load_dept
    model = load_dept("t5-base", "runs/x/adapter")       # one process, no DeepSpeed, CPU or GPU
    model.generate(["premise: ... hypothesis: ..."])

The command line is `dept` (pipeline/cli.py). Importing this package imports nothing heavy.
"""

from __future__ import annotations

from pipeline._version import __version__

__all__ = ["__version__", "load_dept"]


def load_dept(model: str, adapter: str, device: str | None = None, seed: int = 42):
    """A trained adapter on its backbone, ready to generate (see `pipeline.inference.load_dept`)."""
    from pipeline.inference import load_dept as _load

    return _load(model, adapter, device=device, seed=seed)
