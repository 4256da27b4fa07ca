"""A recipe's wall time one job at a time and several at once, side by side, with the check that both give the same
scores (#19). Numbers and the command: docs/bench.md, "Parallel jobs".

    python -m pipeline.bench.parallel                                   # the quickstart: --parallel 1 vs auto
    python -m pipeline.bench.parallel --recipe RECIPE --parallel 1,2,auto --output_dir runs/bench-parallel

Each setting runs `dept run RECIPE --parallel P` in a fresh output folder (nothing reused, tracking off), one after
the other on the same machine, and the table says how long each took and whether its summary's scores equal the
first setting's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def scores(out: Path) -> dict:
    """What must not depend on scheduling: the summary's source rows' test scores and the transfer tables."""
    summary = json.loads((out / "summary.json").read_text())
    return {"sources": [s.get("test") for s in summary["sources"]], "transfer": summary["transfer"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--parallel", default="1,auto", help="comma-separated settings, the first is the reference")
    parser.add_argument("--output_dir", default="runs/bench-parallel")
    args, overrides = parser.parse_known_args(argv)
    root = Path(args.output_dir)
    rows = []
    for setting in args.parallel.split(","):
        out = root / f"parallel-{setting}"
        if out.exists():
            raise SystemExit(f"error: {out} exists: choose another --output_dir (every setting must start fresh)")
        command = [sys.executable, "-m", "pipeline.cli", "run", args.recipe, f"--output_dir={out}"]
        command += [f"--parallel={setting}", "--tracking.enabled=false", *overrides]
        started = time.time()
        proc = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
        seconds = time.time() - started
        out.mkdir(parents=True, exist_ok=True)
        (out / "console.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(command)} exited {proc.returncode}; see {out / 'console.log'}")
        workers = next((line for line in proc.stdout.splitlines() if line.startswith("running up to")), "")
        rows.append((setting, workers.split(" jobs")[0].removeprefix("running up to ") or "1", seconds, scores(out)))
    reference = rows[0][3]
    load = os.getloadavg()
    lines = [
        f"recipe {args.recipe}, {len(os.sched_getaffinity(0))} cores, load average at the end {load[0]:.1f} "
        f"(1 min) {load[2]:.1f} (15 min)",
        "",
        "| --parallel | jobs at once | wall time | vs first | same scores as first |",
        "|---|---|---|---|---|",
    ]
    for setting, at_once, seconds, result in rows:
        ratio = seconds / rows[0][2]
        same = "yes" if result == reference else "NO"
        lines.append(f"| {setting} | {at_once} | {seconds / 60:.1f} min ({seconds:.0f} s) | {ratio:.2f}x | {same} |")
    text = "\n".join(lines)
    print(text)
    (root / "bench_parallel.md").write_text(text + "\n")
    return 0 if all(r[3] == reference for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
