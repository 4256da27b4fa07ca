"""The pictures (plots.py): summary.png of a recipe and curves.png of a job, drawn with matplotlib only when asked."""

from __future__ import annotations

import struct
import textwrap
from pathlib import Path

import pytest
from support import job_results

from pipeline.summary import summarize


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def test_pictures(jobs, tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib draws summary.png and curves.png (pip install matplotlib)")
    from pipeline.plots import DPI, plot_job, plot_summary

    results = job_results(jobs)
    summary = summarize("small", jobs, results)
    train = {j.stage: results[j.key] for j in jobs if j.meta["type"] == "train"}
    path = plot_summary(summary, train, tmp_path / "summary.png")
    width, height = _png_size(path)
    assert width == round(5.2 * 4 * DPI) and height == round(4.0 * DPI)  # loss, validation, two transfer stages
    only_transfer = plot_summary(summary, {}, tmp_path / "transfer.png")
    assert _png_size(only_transfer)[0] == round(5.2 * 2 * DPI)
    result = {
        "history": [
            {
                "step": s,
                "loss": 3.0 / s,
                "lr_prompt": 0.3 * min(s / 4, (12 - s + 1) / 9),
                "lr_lowrank": 1e-4 * min(s / 4, (12 - s + 1) / 9),
            }
            for s in range(1, 13)
        ],
        "evals": [{"step": 6, "score": 50.0}, {"step": 12, "score": 62.5}],
        "best_step": 12,
        "test_score": 60.0,
    }
    curves = plot_job(result, "k=4 seed=1 source syn-target-food", tmp_path / "job" / "curves.png")
    assert _png_size(curves) == (round(13 * DPI), round(3.6 * DPI))
    empty = plot_job({"history": [], "evals": []}, "nothing logged", tmp_path / "empty.png")
    assert empty.stat().st_size > 1000
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_summary({"recipe": "r", "transfer": [], "sources": []}, {}, tmp_path / "none.png")


def test_plots_import_matplotlib_only_when_drawing():
    import subprocess
    import sys

    code = textwrap.dedent("""
        import sys
        import pipeline.plots, pipeline.runner, pipeline.summary, pipeline.tracking
        print("matplotlib" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
