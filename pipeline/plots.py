"""Pictures of a recipe's results: `summary.png` next to `summary.md`, and each job's `curves.png`.

    summary.png  train stages: training loss and validation score against step; each transfer stage: test score
                 against k, from the source adapter and from scratch, mean with error bars (std over seeds)
    methods.png  recipes with `compare_methods`: test score against trainable parameters and against step time
    curves.png   one job: loss, learning rate of each parameter group (relative to its peak, so warm-up then decay
                 reads the same for a 0.3 prompt rate and a 1e-4 low-rank one), validation score (best step marked)

The look follows `dept bench`'s plots (pipeline/bench/compare_report.py): matplotlib's Agg backend and default style,
light grids, small legends, 110 dpi. matplotlib is imported inside the functions, only when a picture is drawn.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

DPI = 110
START_STYLE = {"source": ("o-", "source adapter"), "scratch": ("s--", "from scratch")}


def draw(plot, *args) -> Path | None:
    """`plot(*args)` (the last argument is the picture's path); a missing matplotlib or a failing plot costs the
    picture, never the run."""
    try:
        return plot(*args)
    except ImportError as exc:
        log.warning("no %s: matplotlib is not installed (%s); pip install matplotlib", args[-1], exc)
    except Exception as exc:  # noqa: BLE001 -- see docstring
        log.warning("could not draw %s: %s: %s", args[-1], type(exc).__name__, exc)
    return None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict], key: str) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in points], [p[1] for p in points]


def _finish(fig, axes, path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path


def plot_job(result: dict, title: str, path: str | Path) -> Path:
    """A job's `curves.png` from its results (`history`: the logged training records, `evals`: validations)."""
    plt = _pyplot()
    history, evals = result.get("history") or [], result.get("evals") or []
    fig, (ax_loss, ax_lr, ax_val) = plt.subplots(1, 3, figsize=(13, 3.6))
    steps, losses = _series(history, "loss")
    ax_loss.plot(steps, losses, ".-", label="training loss (mean over the logging window)")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    groups = sorted({k for r in history for k in r if k.startswith("lr_")})
    for key in groups:
        xs, ys = _series(history, key)
        peak = max(ys, default=0.0)
        ax_lr.plot(xs, [y / peak if peak else 0.0 for y in ys], ".-", label=f"{key[3:]} (peak {peak:.3g})")
    ax_lr.set(xlabel="step", ylabel="learning rate / its peak", title="learning rate", ylim=(0, 1.08))
    xs, ys = _series(evals, "score")
    if xs:
        ax_val.plot(xs, ys, "o-", label="validation score")
        best = result.get("best_step")
        if best in xs:
            ax_val.plot([best], [ys[xs.index(best)]], "*", markersize=12, label=f"best step {best}")
        test = result.get("test_score")
        if isinstance(test, (int, float)) and best is not None:
            ax_val.plot([best], [test], "D", label=f"test at best step: {test:.1f}")
    else:
        ax_val.text(0.5, 0.5, "no validation", ha="center", va="center", transform=ax_val.transAxes, color="grey")
    ax_val.set(xlabel="step", ylabel="score", title="validation")
    fig.suptitle(title, fontsize=10)
    try:
        return _finish(fig, (ax_loss, ax_lr, ax_val), path)
    finally:
        plt.close(fig)


def plot_summary(summary: dict, train_results: dict[str, dict], path: str | Path) -> Path:
    """A recipe's `summary.png`: `summary` from `pipeline.summary.summarize`, `train_results[stage]` the results of
    each train stage's job (their `history` and `evals`)."""
    plt = _pyplot()
    transfer_stages = list(dict.fromkeys(row["stage"] for row in summary["transfer"]))
    panels = (2 if train_results else 0) + len(transfer_stages)
    if panels == 0:
        raise ValueError("nothing to plot: the summary has neither train nor transfer stages")
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 4.0), squeeze=False)
    axes = list(axes[0])
    used = []
    if train_results:
        ax_loss, ax_val = axes[0], axes[1]
        for stage, result in train_results.items():
            xs, ys = _series(result.get("history") or [], "loss")
            ax_loss.plot(xs, ys, ".-", label=stage)
            xs, ys = _series(result.get("evals") or [], "score")
            if xs:
                ax_val.plot(xs, ys, "o-", label=stage)
        ax_loss.set(xlabel="step", ylabel="training loss", title="train stages: loss")
        ax_val.set(xlabel="step", ylabel="validation score", title="train stages: validation")
        used += [ax_loss, ax_val]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, stage in zip(axes[len(used) :], transfer_stages):
        rows = [r for r in summary["transfer"] if r["stage"] == stage and r["mean"] is not None]
        targets = list(dict.fromkeys(r["target"] for r in rows))
        ks = sorted({r["k"] for r in rows})
        for i, target in enumerate(targets):
            for start, (style, label) in START_STYLE.items():
                series = sorted(
                    (r for r in rows if r["target"] == target and r["start"] == start), key=lambda r: r["k"]
                )
                if not series:
                    continue
                ax.errorbar(
                    [r["k"] for r in series],
                    [r["mean"] for r in series],
                    yerr=[r["std"] for r in series],
                    fmt=style,
                    capsize=3,
                    color=colors[i % len(colors)],
                    label=f"{target}, {label}",
                )
        if len(ks) > 1:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        n = sorted({r["n"] for r in rows})
        seeds = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
        ax.set(
            xlabel="k (training examples)",
            ylabel=f"test score, mean +- std over {seeds} seed(s)",
            title=f"{stage}: score against k",
        )
        used.append(ax)
    fig.suptitle(summary["recipe"], fontsize=10)
    try:
        return _finish(fig, used, path)
    finally:
        plt.close(fig)


def plot_methods(summary: dict, path: str | Path) -> Path:
    """A recipe's `methods.png` (recipes with `compare_methods`): test score against trainable parameters (log
    scale) and against step time, one point per stage (mean with error bars: std over seeds), one colour per
    method."""
    plt = _pyplot()
    rows = [r for r in summary.get("methods") or [] if r["mean"] is not None]
    if not rows:
        raise ValueError("nothing to plot: no scored rows in the methods table")
    fig, (ax_params, ax_time) = plt.subplots(1, 2, figsize=(10.4, 4.0))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for row in rows:
        color = colors[methods.index(row["method"]) % len(colors)]
        label = f"{row['stage']} ({row['method']})"
        if len({r["target"] for r in rows}) > 1:
            label += f", {row['target']}"
        for ax, x in ((ax_params, row["trainable_params"]), (ax_time, row["step_ms"])):
            if x is None:
                continue
            ax.errorbar([x], [row["mean"]], yerr=[row["std"]], fmt="o", capsize=3, color=color, label=label)
            ax.annotate(row["stage"], (x, row["mean"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    n = sorted({r["n"] for r in rows})
    seeds = f"{n[0]}" if len(n) == 1 else f"{n[0]}-{n[-1]}"
    ax_params.set_xscale("log")
    ax_params.set(
        xlabel="trainable parameters", ylabel=f"test score, mean +- std over {seeds} seed(s)", title="score vs size"
    )
    ax_time.set(xlabel="median step time (ms)", ylabel="test score", title="score vs step time")
    fig.suptitle(summary["recipe"], fontsize=10)
    try:
        return _finish(fig, (ax_params, ax_time), path)
    finally:
        plt.close(fig)


def _log_scale(key: str, values: list) -> bool:
    """Learning rates (and any positive key spread over more than a factor 10) read on a log axis."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if len(numbers) != len(values) or not numbers or min(numbers) <= 0:
        return False
    return "lr" in key.rsplit(".", 1)[-1] or max(numbers) / min(numbers) > 10


def plot_sweeps(sweeps: list[dict], path: str | Path) -> Path:
    """A recipe's `sweep.png`: per swept stage (`summary.sweep_tables`), the best validation score of each trial
    over the first two swept keys, the winner circled. A full grid is a heat map (one cell per pair of values,
    annotated; a third key's best value per cell); a sampled sweep a scatter coloured by score, learning rates on
    log axes. Pruned trials are crossed; one swept key: score against its values."""
    plt = _pyplot()
    if not sweeps:
        raise ValueError("nothing to plot: no swept stage")
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.6 * len(sweeps), 4.4), squeeze=False)
    axes = list(axes[0])
    for ax, table in zip(axes, sweeps):
        keys, rows = table["keys"], table["trials"]
        scored = [r for r in rows if isinstance(r["best_validation"], (int, float))]
        winner = next((r for r in rows if r["winner"]), None)
        title = f"{table['stage']}: best validation score" + (f"\nbest: {winner['setting']}" if winner else "")
        if len(keys) == 1:
            key = keys[0]
            points = sorted((r["values"][key], r["best_validation"]) for r in scored)
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label="trials")
            if winner:
                ax.plot([winner["values"][key]], [winner["best_validation"]], "*", markersize=14, label="best")
            if _log_scale(key, [p[0] for p in points]):
                ax.set_xscale("log")
            ax.set(xlabel=key, ylabel="best validation score", title=title)
            continue
        kx, ky = keys[0], keys[1]
        xs = sorted({r["values"][kx] for r in rows}, key=_sort_key)
        ys = sorted({r["values"][ky] for r in rows}, key=_sort_key)
        cells: dict[tuple, float] = {}
        for r in scored:
            cell = (xs.index(r["values"][kx]), ys.index(r["values"][ky]))
            cells[cell] = max(cells.get(cell, float("-inf")), r["best_validation"])
        if len(cells) == len(xs) * len(ys) > 1:  # every pair of values scored: a grid
            import numpy as np

            grid = np.full((len(ys), len(xs)), np.nan)
            for (i, j), score in cells.items():
                grid[j, i] = score
            image = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
            fig.colorbar(image, ax=ax, label="best validation score")
            middle = (np.nanmin(grid) + np.nanmax(grid)) / 2
            for (i, j), score in cells.items():  # dark text on the bright (viridis: yellow) upper half
                color = "black" if score > middle else "white"
                ax.text(i, j, f"{score:.1f}", ha="center", va="center", fontsize=9, color=color)
            ax.set_xticks(range(len(xs)), [_tick(v) for v in xs])
            ax.set_yticks(range(len(ys)), [_tick(v) for v in ys])
            for r in rows:
                at = (xs.index(r["values"][kx]), ys.index(r["values"][ky]))
                if r["pruned_at"] is not None:
                    ax.plot(*at, "x", color="red", markersize=12)
                if r["winner"]:
                    ax.plot(*at, "o", markersize=26, markerfacecolor="none", markeredgecolor="red", markeredgewidth=2)
            ax.set(xlabel=kx, ylabel=ky, title=title)
            continue
        colors = ax.scatter(
            [r["values"][kx] for r in scored],
            [r["values"][ky] for r in scored],
            c=[r["best_validation"] for r in scored],
            cmap="viridis",
            s=60,
        )
        fig.colorbar(colors, ax=ax, label="best validation score")
        for r in rows:
            if r["pruned_at"] is not None:
                ax.plot(r["values"][kx], r["values"][ky], "x", color="red", markersize=10)
        if winner:
            ax.plot(
                winner["values"][kx],
                winner["values"][ky],
                "o",
                markersize=18,
                markerfacecolor="none",
                markeredgecolor="red",
                markeredgewidth=2,
                label="best",
            )
        if _log_scale(kx, xs):
            ax.set_xscale("log")
        if _log_scale(ky, ys):
            ax.set_yscale("log")
        ax.set(xlabel=kx, ylabel=ky, title=title)
    fig.suptitle("sweep: each trial's best validation score (red circle: the winner; x: pruned)", fontsize=10)
    try:
        return _finish(fig, axes, path)
    finally:
        plt.close(fig)


def _sort_key(value):
    return (0, value, "") if isinstance(value, (int, float)) and not isinstance(value, bool) else (1, 0, str(value))


def _tick(value) -> str:
    return format(value, "g") if isinstance(value, float) else str(value)
