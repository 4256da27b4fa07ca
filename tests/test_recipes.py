"""Recipes: every shipped recipe validates and matches the paper's settings; bad recipes fail before training
with one line; overrides beat the file; plans chain stages (fast, no training)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import REPO, run
from pipeline.errors import PipelineError
from pipeline.recipe import apply_overrides, load_recipe, plan, validate

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_validates_and_prints_its_plan(path):
    shown = run(["run", str(path), "--dry_run"])
    assert f"recipe {path.stem}:" in shown.stdout and "world size" in shown.stdout
    assert plan(load_recipe(str(path)))


def stage_cfg(recipe, name):
    return next(r.train for r in plan(recipe) if r.stage == name)


def test_paper_recipes_follow_the_paper():
    glue = load_recipe(str(REPO / "recipes" / "glue_t5_base.yaml"))
    assert glue.model == "t5-base"
    for name in ("mnli", "qqp", "qnli", "sst2", "stsb", "mrpc", "rte"):
        cfg = stage_cfg(glue, name)
        assert (cfg.num_virtual_tokens, cfg.r, cfg.max_length, cfg.lora_alpha) == (60, 30, 256, 8.0)
        assert cfg.lr_prompt == 0.3 and cfg.lr_lowrank in (1e-4, 5e-4, 1e-3, 5e-3)
        assert (cfg.batch_size, cfg.warmup_steps, cfg.eval_every, cfg.grad_clip, cfg.weight_decay) == (32, 500, 1000, 1.0, 0.0)
    cola = stage_cfg(glue, "cola")
    assert (cola.num_virtual_tokens, cola.r) == (80, 15)
    superglue = load_recipe(str(REPO / "recipes" / "superglue_t5_base.yaml"))
    boolq, multirc = stage_cfg(superglue, "boolq"), stage_cfg(superglue, "multirc")
    assert (boolq.num_virtual_tokens, boolq.r, boolq.max_length) == (40, 45, 256)
    assert (multirc.num_virtual_tokens, multirc.max_length) == (60, 348)
    few = load_recipe(str(REPO / "recipes" / "fewshot_transfer.yaml"))
    transfer = next(s for s in few.stages if s.type == "transfer")
    assert transfer.k == [4, 16, 32] and len(transfer.seeds) == 3
    assert {"boolq", "cb", "scitail"} <= set(transfer.targets)
    small = load_recipe(str(REPO / "recipes" / "fewshot_small.yaml"))
    assert next(s for s in small.stages if s.type == "train").tasks == ["mnli", "qnli"]
    assert next(s for s in small.stages if s.type == "transfer").targets == ["rte", "cb", "mrpc"]


def test_overrides_beat_the_file_and_reach_nested_stage_keys():
    raw = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())
    changed = validate(apply_overrides(raw, {"train.steps": "7", "stages.transfer.k": "[4]",
                                             "stages.1.train.lr_prompt": 0.1, "dept.r": 2}))
    runs = plan(changed)
    transfer = [r for r in runs if r.stage == "transfer"]
    assert {r.data.k for r in transfer} == {4}
    assert next(r for r in runs if r.stage == "source").train.lr_prompt == 0.1
    assert next(r for r in runs if r.stage == "source").train.steps == 7
    assert all(r.train.r == 2 for r in runs if r.train.method == "dept")


def test_transfer_runs_all_start_from_the_same_source_adapter():
    recipe = load_recipe(str(REPO / "recipes" / "quickstart.yaml"))
    transfer = [r for r in plan(recipe) if r.stage == "transfer"]
    from_source = {r.train.init_adapter for r in transfer if r.meta["variant"] == "transfer"}
    assert from_source == {str(Path(recipe.output_dir) / "source" / "best_adapter")}
    assert all(r.train.init_adapter is None for r in transfer if r.meta["variant"] == "control")
    assert len({r.train.output_dir for r in transfer}) == len(transfer) == 2 * 3 * 3 * 2


BAD = {
    "unknown top-level key": ({"stepz": 3}, "recipe.stepz: unknown key"),
    "unknown nested key": ({"train": {"stpes": 3}}, "recipe.train.stpes: unknown key"),
    "wrong type": ({"train": {"steps": "many"}}, "recipe.train.steps: expected int"),
    "stage wrong type": ({"stages": [{"name": "a", "tasks": ["rte"], "train": {"lr_prompt": "high"}}]},
                         "recipe.stages[0] (a).train.lr_prompt: expected float"),
    "missing stage input": ({"stages": [{"name": "a", "type": "train"}]}, "a train stage needs at least one task"),
    "transfer from missing stage": ({"stages": [{"name": "t", "type": "transfer", "source": "nope", "targets": ["rte"]}]},
                                    "'nope' is not an earlier stage"),
    "no stages": ({"stages": []}, "recipe.stages: give a non-empty list"),
    "k not ints": ({"stages": [{"name": "t", "type": "transfer", "source": "/", "targets": ["rte"], "k": ["x"]}]},
                   "recipe.stages[0] (t).k: give a non-empty list of integers"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_are_refused_with_the_key_path(case, tmp_path):
    change, expected = BAD[case]
    raw = {"name": "bad", "model": "random:tiny-t5", "output_dir": str(tmp_path / "out"),
           "stages": [{"name": "a", "tasks": ["rte"]}]}
    raw.update(change)
    with pytest.raises(PipelineError, match=None) as err:
        validate(raw)
    assert expected in str(err.value) and "\n" not in str(err.value)
    # and through the CLI: exit 2, one line, nothing written
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    proc = run(["run", str(path)], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and expected in proc.stderr
    assert not (tmp_path / "out").exists()


def test_unreachable_tracking_uri_fails_before_training(tmp_path):
    from conftest import free_port

    out = tmp_path / "out"
    proc = run(["run", str(REPO / "recipes" / "quickstart.yaml"), f"--output_dir={out}",
                f"--tracking.uri=http://127.0.0.1:{free_port()}"], check=False)
    assert proc.returncode == 2 and "unreachable" in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert not out.exists()
