"""`dept bench` output: bench.md / bench.json / bench.png written atomically, number formatting, MLflow logging."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from pipeline.bench.settings import BenchArgs
from pipeline.options import to_dict

log = logging.getLogger("pipeline.bench")

# What each row of the comparison measures, as numbers (bench.json's rows; MLflow metrics `<row>.<column>`).
MEASURED = (
    "step_s",
    "step_min_s",
    "step_max_s",
    "tokens_per_s",
    "step_tensor_peak_mb",
    "rss_peak_mb",
    "infer_s",
    "epoch_s",
    "enc_tokens",
)


def settings_record(args: BenchArgs) -> dict:
    """The settings as JSON values (bench.json's `settings`, MLflow params)."""
    return to_dict(args)


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


def count_label(n: int) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M"


def fmt_ratio(value: dict | None) -> str:
    if not value or value.get("median") is None:
        return "-"
    if value.get("min") is None:
        return fmt(value["median"])
    return f"{fmt(value['median'])} [{fmt(value['min'])} .. {fmt(value['max'])}]"


def write_outputs(
    output_dir: str, result: dict, markdown: Callable[[dict], str], plot: Callable[[dict, Path], None]
) -> None:
    """bench.md (`markdown(result)`), bench.json and bench.png (`plot(result, path)`) in `output_dir`, written
    atomically; the table on stdout (rank 0)."""
    from pipeline import atomic

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result)
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
            for col in MEASURED:
                put(f"{row['key']}.{col}", row[col])
            for col in ("x_pt", "x_bare_same_len"):
                if row[col]:
                    put(f"{row['key']}.{col}", row[col]["median"])
        for ratio in result["ratios"]:
            if ratio["value"]:
                put(f"ratio.{ratio['key']}", ratio["value"]["median"])
    else:
        for key in (
            "load_s",
            "engine_init_s",
            "step_s",
            "tokens_per_s",
            "backbone_params",
            "peak_used_mb",
            "headroom_mb",
            "total_ram_mb",
        ):
            put(key, result[key])
        for r in result["ranks"]:
            put(f"rank{r['rank']}.held_param_bytes", r["held_param_bytes"])
            put(f"rank{r['rank']}.ru_maxrss_mb", r["ru_maxrss_mb"])
    return metrics


def track(args: BenchArgs, result: dict | None) -> None:
    """Log the run to MLflow (when --mlflow_uri is set) through `pipeline.tracking.Tracker`: one run with the
    settings as params, every number (the paired ratios included) as a metric, bench.md/json/png as artifacts.

    Called on every rank (opening the run is a collective under several ranks); only rank 0, which holds
    `result`, logs."""
    if not args.mlflow_uri:
        return
    import hashlib

    from pipeline.tracking import Tracker

    settings = settings_record(args)
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    key = f"bench.{args.mode}.{digest}.{time.time_ns()}"  # a new run per measurement (rank 0's key counts)
    name = f"bench-{args.mode}-{args.model.replace(':', '-')}"
    with Tracker(args.mlflow_uri, args.experiment) as tracker:
        run_id = tracker.parent(name, key)
        if result is None:
            return
        params = {k: v for k, v in settings.items() if k != "mlflow_uri" and v not in (None, "")}
        tracker.log_params(params, run_id)
        tracker.set_tags({"dept.bench": result["mode"]}, run_id)
        tracker.log_metrics(_metrics(result), step=0, run_id=run_id)
        out = Path(args.output_dir)
        for file in ("bench.md", "bench.json", "bench.png"):
            tracker.log_artifact(out / file, run_id=run_id)
        tracker.finish(run_id)
        log.info("logged to MLflow run %s at %s (experiment %s)", run_id, tracker.uri, args.experiment)
