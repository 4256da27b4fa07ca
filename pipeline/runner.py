"""`dept run RECIPE.yaml`: execute a recipe's plan, track it in MLflow, aggregate the results.

    dept run recipes/quickstart.yaml                      # one process
    ./launch.sh run recipes/quickstart.yaml               # every local rank (2 CPU ranks without GPUs)
    dept run recipes/fewshot_small.yaml --dry_run         # print the plan, train nothing

Reads top to bottom: load + validate -> plan -> check tracking -> parent run -> each run (skipped when its
results.json exists, resumed from its checkpoint when it stopped half-way) in a child run -> summary.json and
summary.md (task x k, mean +- std over seeds, plus the source stages' scores) -> printed table.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import statistics
from pathlib import Path

from pipeline import atomic, distributed
from pipeline.errors import PipelineError
from pipeline.recipe import Recipe, Run, fingerprint, load_recipe, plan, resolved_dict

log = logging.getLogger(__name__)


def describe_plan(recipe: Recipe, runs: list[Run]) -> str:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    lines = [f"recipe {recipe.name}: {len(runs)} runs in {len(recipe.stages)} stages, world size {world}, "
             f"output {recipe.output_dir}"]
    for stage in recipe.stages:
        mine = [r for r in runs if r.stage == stage.name]
        first = mine[0].train
        what = ", ".join(mine[0].meta.get("tasks", [])) if stage.type == "train" else (
            f"targets {', '.join(dict.fromkeys(str(r.meta['target']) for r in mine))}; k {stage.k}; seeds {stage.seeds}"
            + ("; with from-scratch control" if stage.control else ""))
        lines.append(f"  {stage.name} ({stage.type}, {first.method}, model {first.model}): {len(mine)} run(s); {what}; "
                     f"m={first.num_virtual_tokens} r={first.r} s={first.max_length} steps={first.steps} "
                     f"batch={first.batch_size} lr_prompt={first.lr_prompt} lr_lowrank={first.lr_lowrank}")
    return "\n".join(lines)


def run_recipe(path: str, overrides: dict | None = None, dry_run: bool = False) -> dict | None:
    from pipeline.stage import run_stage
    from pipeline.tracking import Tracker, check_reachable, resolve_tracking_uri

    recipe = load_recipe(path, overrides)
    runs = plan(recipe)
    if dry_run:
        print(describe_plan(recipe, runs))
        return None
    out = Path(recipe.output_dir)
    uri = resolve_tracking_uri(recipe.tracking.uri, Path.cwd()) if recipe.tracking.enabled else None
    if uri:
        check_reachable(uri)  # before any training: a wrong URI fails now, not after hours
    rank, _ = distributed.init(float(recipe.train.get("comm_timeout_s", 1800.0)))
    if rank == 0:
        print(describe_plan(recipe, runs))
        atomic.write_text(out / "recipe.resolved.yaml", _yaml(resolved_dict(recipe)))
    tracker = Tracker(uri, recipe.tracking.experiment, enabled=recipe.tracking.enabled)
    recipe_key = fingerprint(recipe)
    parent = tracker.parent(recipe.name, recipe_key)
    tracker.log_params({"recipe": recipe.name, "stages": len(recipe.stages), "runs": len(runs),
                        "world_size": distributed.world_size()}, run_id=parent)
    if rank == 0:
        tracker.log_artifact(out / "recipe.resolved.yaml", run_id=parent)
    results: dict[str, dict] = {}
    for run in runs:
        results[run.key] = _execute(run, tracker, recipe_key, run_stage)
        gc.collect()
    summary = summarize(recipe, runs, results)
    if rank == 0:
        atomic.write_json(out / "summary.json", summary)
        atomic.write_text(out / "summary.md", summary["markdown"])
        print(summary["markdown"])
        for name in ("summary.json", "summary.md"):
            tracker.log_artifact(out / name, run_id=parent)
    tracker.finish(parent)
    distributed.barrier()
    return summary


def _execute(run: Run, tracker, recipe_key: str, run_stage) -> dict:
    """Run one plan entry inside its child run; reuse it when it already finished."""
    results_file = Path(run.train.output_dir) / "results.json"
    child_key = f"{recipe_key}-{run.key.replace('/', '.')}"
    if results_file.exists():
        if distributed.rank() == 0:
            log.info("%s: finished earlier, reusing %s", run.key, results_file)
        result = json.loads(results_file.read_text())
        if not tracker.is_finished(child_key):  # crashed between results.json and closing the child run
            child = tracker.child(run.key, child_key, _params(run))
            tracker.finish(child)
        return result
    if run.train.init_adapter and not Path(run.train.init_adapter).exists():
        raise PipelineError(f"{run.key}: the source adapter {run.train.init_adapter} does not exist; did its stage "
                            "finish? run the recipe from the start")
    child = tracker.child(run.key, child_key, _params(run))
    tracker.set_tags({"dept.stage": run.stage, **{f"dept.{k}": str(v) for k, v in run.meta.items()}}, run_id=child)
    outcome = run_stage(run.train, run.data, callbacks=[tracker.callback_for(child)],
                        on_data=lambda name, split, rows: tracker.log_dataset(rows, name, split, run_id=child))
    result = outcome["results"]
    del outcome
    if distributed.rank() == 0:
        out = Path(run.train.output_dir)
        for name in ("results.json", "adapter", "best_adapter"):
            if (out / name).exists():
                tracker.log_artifact(out / name, run_id=child)
    tracker.finish(child)
    return result


def _params(run: Run) -> dict:
    from dataclasses import asdict

    cfg = asdict(run.train)
    keep = ("model", "method", "num_virtual_tokens", "r", "max_length", "lr_prompt", "lr_lowrank", "lr",
            "batch_size", "grad_accum", "steps", "warmup_steps", "seed", "init_adapter", "ds_config")
    ds = json.loads(Path(run.train.ds_config).read_text()) if Path(run.train.ds_config).is_file() else {}
    return {**{k: cfg[k] for k in keep}, **run.meta, "world_size": distributed.world_size(),
            "zero_stage": ds.get("zero_optimization", {}).get("stage"), "k": run.data.k,
            "eval_mode": run.data.eval_mode}


def _main_score(result: dict) -> float | None:
    test = result.get("test") or {}
    return test.get("score")


def summarize(recipe: Recipe, runs: list[Run], results: dict[str, dict]) -> dict:
    """Source stages' scores and, per transfer stage, mean +- std over seeds for each (target, k, variant)."""
    sources, cells = [], {}
    for run in runs:
        result = results[run.key]
        if run.meta["type"] == "train":
            sources.append({"stage": run.stage, "tasks": run.meta["tasks"], "test": result.get("test", {}),
                            "best_step": result.get("best_step"), "final_loss": result.get("final_loss")})
            continue
        cell = (run.stage, run.meta["target"], run.meta["k"], run.meta["variant"])
        cells.setdefault(cell, []).append(_main_score(result))
    table = []
    for (stage, target, k, variant), scores in sorted(cells.items(), key=lambda x: (x[0][0], x[0][1], x[0][3], x[0][2])):
        valid = [s for s in scores if s is not None]
        table.append({"stage": stage, "target": target, "k": k, "variant": variant, "n": len(valid), "scores": valid,
                      "mean": statistics.fmean(valid) if valid else None,
                      "std": statistics.stdev(valid) if len(valid) > 1 else 0.0})
    summary = {"recipe": recipe.name, "sources": sources, "transfer": table}
    summary["markdown"] = _markdown(recipe, summary)
    return summary


def _markdown(recipe: Recipe, summary: dict) -> str:
    lines = [f"# {recipe.name}", ""]
    if summary["sources"]:
        lines += ["| stage | tasks | best step | test (main metric and others) |", "|---|---|---|---|"]
        for s in summary["sources"]:
            test = ", ".join(f"{k} {v:.1f}" for k, v in s["test"].items()
                             if isinstance(v, float) and k != "score" and not k.endswith("/score"))
            lines.append(f"| {s['stage']} | {', '.join(s['tasks'])} | {s['best_step']} | {test or '-'} |")
        lines.append("")
    by_stage: dict[str, list] = {}
    for row in summary["transfer"]:
        by_stage.setdefault(row["stage"], []).append(row)
    for stage, rows in by_stage.items():
        ks = sorted({r["k"] for r in rows})
        lines += [f"## {stage}: test main metric, mean +- std over seeds", "",
                  "| target | start | " + " | ".join(f"k={k}" for k in ks) + " |",
                  "|---|---|" + "---|" * len(ks)]
        for target, variant in sorted({(r["target"], r["variant"]) for r in rows}):
            cells = []
            for k in ks:
                row = next((r for r in rows if (r["target"], r["variant"], r["k"]) == (target, variant, k)), None)
                cells.append("-" if row is None or row["mean"] is None else f"{row['mean']:.1f} +- {row['std']:.1f} (n={row['n']})")
            start = "source adapter" if variant == "transfer" else "from scratch"
            lines.append(f"| {target} | {start} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _yaml(obj) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)
