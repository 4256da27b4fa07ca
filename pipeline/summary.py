"""A recipe's results in one table: each train stage's test scores, and for each transfer stage the mean +- std
over seeds of every (target, k, start) cell. Pure functions of the jobs' results (no torch, no MLflow)."""

from __future__ import annotations

import statistics

from pipeline import sweep


def main_score(result: dict) -> float | None:
    """A job's reported test score: the task's first metric (job.py records it; a mixture: the mean score)."""
    return result.get("test_score")


def summarize(
    name: str, jobs: list, results: dict[str, dict], run: dict | None = None, compare_methods: bool = False
) -> dict:
    """`{"recipe", "sources": [...], "transfer": [...], "sweeps": [...], "methods": [...], "markdown"}` from
    `results[job.key]`; "methods" (`methods_table`) only when the recipe asks for it (`compare_methods`). A swept
    stage's source row is its winning trial; "sweeps" lists each swept stage's trials (`sweep_tables`)."""
    sources, cells = [], {}
    sweeps = sweep_tables(jobs, results)
    winners = {s["stage"]: s["winner"] for s in sweeps}
    for job in jobs:
        result = results[job.key]
        if job.meta["type"] == "train":
            if sweep.is_trial(job) and winners.get(job.stage) != job.key:
                continue
            shape = result.get("dept_shape") or {}
            speed = [h["tokens_per_s"] for h in result.get("history", []) if "tokens_per_s" in h]
            sources.append(
                {
                    "stage": job.stage,
                    "key": job.key,
                    "tasks": job.meta["tasks"],
                    **({"trial": job.meta["trial"]} if sweep.is_trial(job) else {}),
                    "test": _rounded(result.get("test", {})),
                    "best_step": result.get("best_step"),
                    "final_loss": result.get("final_loss"),
                    "method": result.get("config", {}).get("method"),
                    "trainable_params": result.get("trainable_params"),
                    "prompt_tokens": shape.get("num_virtual_tokens"),
                    "tokens_per_s": round(statistics.median(speed)) if speed else None,
                }
            )
            continue
        cell = (job.stage, job.meta["target"], job.meta["k"], job.meta["start"])
        cells.setdefault(cell, []).append(main_score(result))
    table = []
    for (stage, target, k, start), scores in sorted(cells.items(), key=lambda c: (c[0][0], c[0][1], c[0][3], c[0][2])):
        valid = [s for s in scores if s is not None]
        table.append(
            {
                "stage": stage,
                "target": target,
                "k": k,
                "start": start,
                "n": len(valid),
                "scores": [round(s, 2) for s in valid],
                "mean": round(statistics.fmean(valid), 2) if valid else None,
                "std": round(statistics.stdev(valid), 2) if len(valid) > 1 else 0.0,
            }
        )
    summary = {
        "recipe": name,
        "sources": sources,
        "transfer": table,
        "sweeps": sweeps,
        "methods": methods_table(jobs, results) if compare_methods else [],
    }
    if run:
        summary["run"] = run  # jobs, reused, seconds, world_size, version: the footer line
    summary["markdown"] = markdown(summary)
    return summary


def sweep_tables(jobs: list, results: dict[str, dict]) -> list[dict]:
    """Per swept stage: its swept keys, one row per trial (`sweep.trial_rows`: setting, best validation, at step,
    pruned, test score) and the winner's key (None: no trial has a validation score)."""
    tables = []
    for stage in dict.fromkeys(j.stage for j in jobs if sweep.is_trial(j)):
        trials = [j for j in jobs if j.stage == stage and j.key in results]
        winner = sweep.best_trial(trials, results)
        tables.append(
            {
                "stage": stage,
                "keys": list(trials[0].meta["sweep"]) if trials else [],
                "trials": sweep.trial_rows(trials, results),
                "winner": winner.key if winner else None,
                "winner_setting": winner.meta["trial"] if winner else None,
            }
        )
    return tables


def sweep_markdown(table: dict) -> list[str]:
    """A swept stage's trials in Markdown: each setting's best validation score (the selection metric), its step,
    whether it was pruned, and the test score (reported for the winner; the others' for reference)."""
    keys = table["keys"]
    lines = [
        f"## {table['stage']}: sweep over {', '.join(keys)} (best on validation: {table['winner_setting'] or 'none'})",
        "",
        "| " + " | ".join(keys) + " | best validation | at step | pruned | test |",
        "|" + "---|" * (len(keys) + 4),
    ]
    for row in table["trials"]:
        values = [sweep.value_text(row["values"].get(k)) for k in keys]
        val = "-" if row["best_validation"] is None else f"{row['best_validation']:.1f}"
        if row["winner"]:
            val = f"**{val}** (best)"
        pruned = "-" if row["pruned_at"] is None else f"at step {row['pruned_at']}"
        test = "-" if row["test_score"] is None else f"{row['test_score']:.1f}"
        lines.append(
            f"| {' | '.join(values)} | {val} | {row['best_step'] if row['best_step'] is not None else '-'} | {pruned} | {test} |"
        )
    return lines + [""]


def _median_step_s(result: dict) -> float | None:
    times = [h["step_s"] for h in result.get("history", []) if isinstance(h.get("step_s"), (int, float))]
    return statistics.median(times) if times else None


def methods_table(jobs: list, results: dict[str, dict]) -> list[dict]:
    """Methods side by side: one row per (stage, target, k, start) with the method, its trainable parameters, its
    median step time (median over the jobs of each job's median logged step time) and the test score's mean +- std
    over the jobs (seeds)."""
    groups: dict[tuple, list] = {}
    for job in jobs:
        target = ",".join(job.meta["tasks"]) if job.meta["type"] == "train" else job.meta["target"]
        groups.setdefault((job.stage, target, job.meta.get("k"), job.meta.get("start")), []).append(job)
    rows = []
    for (stage, target, k, start), members in groups.items():
        found = [results[j.key] for j in members]
        scores = [s for s in (main_score(r) for r in found) if s is not None]
        times = [t for t in (_median_step_s(r) for r in found) if t is not None]
        params = sorted({r.get("trainable_params") for r in found if r.get("trainable_params") is not None})
        rows.append(
            {
                "stage": stage,
                "method": members[0].config.method,
                "target": target,
                "k": k,
                "start": start,
                "trainable_params": params[0] if len(params) == 1 else None,
                "step_ms": round(1000 * statistics.median(times), 1) if times else None,
                "n": len(scores),
                "mean": round(statistics.fmean(scores), 2) if scores else None,
                "std": round(statistics.stdev(scores), 2) if len(scores) > 1 else 0.0,
            }
        )
    return sorted(rows, key=lambda r: (r["target"], r["trainable_params"] or 0, r["stage"]))


def methods_markdown(rows: list[dict]) -> str:
    """The methods table (what `methods_table` returns) in Markdown."""
    lines = [
        "| stage | method | target | k | start | trainable | step time (ms) | test score, mean +- std (n) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        score = "-" if r["mean"] is None else f"{r['mean']:.1f} +- {r['std']:.1f} (n={r['n']})"
        step = "-" if r["step_ms"] is None else f"{r['step_ms']:.0f}"
        k = "all" if r["k"] is None else r["k"]
        lines.append(
            f"| {r['stage']} | {r['method']} | {r['target']} | {k} | {r['start'] or '-'} | "
            f"{_count(r['trainable_params'])} | {step} | {score} |"
        )
    return "\n".join(lines) + "\n"


def methods_file(summary: dict) -> str:
    """`methods.md`: the methods table and the run's footer line (what the README shows of methods_small)."""
    return methods_markdown(summary["methods"]) + ("\n" + _footer(summary["run"]) + "\n" if summary.get("run") else "")


def _footer(run: dict) -> str:
    return (
        f"{run['jobs']} jobs ({run['reused']} reused) in {run['seconds']:.0f} s on {run['world_size']} "
        f"rank(s), dept-pipeline {run['version']}."
    )


def _rounded(metrics: dict) -> dict:
    """Scores rounded to 2 decimals (percentages: 55.00000000000001 reads 55.0); counts as they are."""
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in metrics.items()}


def _leaf(key: str) -> str:
    return key.rsplit(".", 1)[-1]


def _metric_text(metrics: dict) -> str:
    return ", ".join(
        f"{k} {v:.1f}" for k, v in metrics.items() if isinstance(v, float) and _leaf(k) not in ("score", "n", "invalid")
    )


def _count(value) -> str:
    return "-" if value is None else f"{value:,}"


def markdown(summary: dict) -> str:
    lines = [f"# {summary['recipe']}", ""]
    if summary["sources"]:
        lines += [
            "| stage | method | tasks | trainable | prompt tokens | tokens/s | best step | test |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for s in summary["sources"]:
            stage = f"{s['stage']} (best trial {s['trial']})" if s.get("trial") else s["stage"]
            lines.append(
                f"| {stage} | {s.get('method') or '-'} | {', '.join(s['tasks'])} | "
                f"{_count(s.get('trainable_params'))} | {_count(s.get('prompt_tokens'))} | "
                f"{_count(s.get('tokens_per_s'))} | {s['best_step']} | {_metric_text(s['test']) or '-'} |"
            )
        lines.append("")
    for table in summary.get("sweeps") or []:
        lines += sweep_markdown(table)
    by_stage: dict[str, list] = {}
    for row in summary["transfer"]:
        by_stage.setdefault(row["stage"], []).append(row)
    for stage, rows in by_stage.items():
        ks = sorted({r["k"] for r in rows})
        lines += [
            f"## {stage}: test score, mean +- std over seeds",
            "",
            "| target | start | " + " | ".join(f"k={k}" for k in ks) + " |",
            "|---|---|" + "---|" * len(ks),
        ]
        for target, start in sorted({(r["target"], r["start"]) for r in rows}):
            cells = []
            for k in ks:
                row = next((r for r in rows if (r["target"], r["start"], r["k"]) == (target, start, k)), None)
                cells.append(
                    "-"
                    if row is None or row["mean"] is None
                    else f"{row['mean']:.1f} +- {row['std']:.1f} (n={row['n']})"
                )
            label = "source adapter" if start == "source" else "from scratch"
            lines.append(f"| {target} | {label} | " + " | ".join(cells) + " |")
        lines.append("")
    if summary.get("methods"):
        lines += ["## methods: test score against trainable parameters and step time", ""]
        lines += [methods_markdown(summary["methods"])]
    run = summary.get("run")
    if run:
        lines.append(_footer(run))
        lines.append("")
    return "\n".join(lines)


def aggregates(summary: dict) -> dict[str, float]:
    """The parent run's metrics: `<target>.k<k>.<start>.mean|std` per transfer cell (prefixed `<stage>.` when a
    recipe has several transfer stages) and each train stage's test scores as `<stage>.test_<metric>`. Names carry
    no '/' (the MLflow UI would make chart sections of it)."""
    out = {}
    stages = {row["stage"] for row in summary["transfer"]}
    for row in summary["transfer"]:
        if row["mean"] is not None:
            stem = f"{row['target']}.k{row['k']}.{row['start']}"
            if len(stages) > 1:
                stem = f"{row['stage']}.{stem}"
            stem = stem.replace("/", "_")
            out[f"{stem}.mean"], out[f"{stem}.std"] = row["mean"], row["std"]
    for source in summary["sources"]:
        for key, value in source["test"].items():
            if isinstance(value, float) and _leaf(key) not in ("score", "n", "invalid"):
                out[f"{source['stage']}.test_{key}".replace("/", "_")] = round(value, 2)
    return out
