"""Recipes: every shipped recipe validates and plans; the paper recipes are the authors' released runs, value for
value; overrides beat the file; inputs resolve against the recipe file; bad recipes fail before training with one
line (fast, in-process: no training, no torch)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, needs_full_data

from pipeline.cli import main
from pipeline.errors import PipelineError
from pipeline.recipe import describe_plan, load_recipe, plan, validate
from pipeline.resources import shipped_names

RECIPES = shipped_names("recipe")

# The DePT authors' released runs (task: m, r, s, lr prompt, lr A/B, steps); T5-base, batch 32, seed 42, warmup 500,
# clip 1.0, eval and save every 1,000 steps, fp32.
RELEASED = {
    "glue_t5_base": {
        "mnli": (60, 30, 256, 0.3, 1e-4, 250_000),
        "qqp": (60, 30, 256, 0.4, 5e-3, 100_000),
        "qnli": (60, 30, 256, 0.4, 5e-3, 100_000),
        "sst2": (60, 30, 256, 0.3, 5e-4, 30_000),
        "stsb": (60, 30, 256, 0.3, 1e-4, 30_000),
        "mrpc": (60, 30, 256, 0.3, 5e-3, 10_000),
        "rte": (60, 30, 256, 0.4, 1e-4, 30_000),
        "cola": (80, 15, 256, 0.3, 5e-4, 40_000),
    },
    "superglue_t5_base": {
        "multirc": (60, 30, 348, 0.3, 5e-3, 30_000),
        "boolq": (40, 45, 256, 0.3, 5e-3, 30_000),
        "wic": (60, 30, 256, 0.3, 1e-3, 20_000),
        "wsc": (60, 30, 256, 0.3, 1e-4, 20_000),
        "cb": (60, 30, 256, 0.4, 1e-4, 30_000),
    },
    "mrqa_t5_base": {
        "nq": (60, 24, 512, 0.3, 1e-4, 300_000),
        "hotpotqa": (60, 24, 512, 0.4, 1e-4, 250_000),
        "searchqa": (60, 24, 512, 0.3, 1e-4, 250_000),
        "newsqa": (60, 24, 512, 0.4, 1e-4, 200_000),
    },
}


@pytest.mark.parametrize("name", RECIPES)
def test_every_shipped_recipe_validates_and_plans(name, capsys, monkeypatch):
    monkeypatch.delenv("DEPT_DATA_DIR", raising=False)  # hub tasks: feasibility checks local data only
    assert main(["run", name, "--dry_run"]) == 0
    shown = capsys.readouterr().out
    assert f"recipe {name}:" in shown and "world size" in shown
    assert plan(load_recipe(name))


@pytest.mark.parametrize("recipe", sorted(RELEASED))
def test_paper_recipes_are_the_authors_released_runs(recipe):
    jobs = {job.stage: job.config for job in plan(load_recipe(recipe))}
    assert set(jobs) == set(RELEASED[recipe])
    for task, (m, r, s, lr_prompt, lr_lowrank, steps) in RELEASED[recipe].items():
        cfg = jobs[task]
        assert cfg.model == "t5-base" and cfg.method == "dept" and cfg.ds_config == "zero3_gpu", task
        assert (cfg.dept.num_virtual_tokens, cfg.dept.r, cfg.dept.max_length) == (m, r, s), task
        assert (cfg.train.lr_prompt, cfg.train.lr_lowrank, cfg.train.steps) == (lr_prompt, lr_lowrank, steps), task
        assert (
            cfg.train.batch_size,
            cfg.train.warmup_steps,
            cfg.train.grad_clip,
            cfg.train.weight_decay,
            cfg.train.seed,
            cfg.train.eval_every,
            cfg.train.save_every,
        ) == (32, 500, 1.0, 0.0, 42, 1000, 1000)
        assert (cfg.dept.lora_alpha, cfg.dept.prompt_init, cfg.dept.init_text) == (
            8.0,
            "TEXT",
            "Classify this text is postive or not:",
        )
        assert (cfg.data.eval_mode, cfg.data.max_new_tokens) == ("generate", 20)
        assert cfg.train.grad_accum == (2 if recipe == "mrqa_t5_base" else 1)  # MRQA: 16 per device x 2


def test_the_fp32_gpu_config_is_what_the_paper_recipes_use():
    import json

    from pipeline.resources import ds_config_path

    ds = json.loads(ds_config_path("zero3_gpu").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and not ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert json.loads(ds_config_path("zero3_gpu_bf16").read_text())["bf16"]["enabled"]


def test_recipes_without_a_released_run_say_so():
    text = (REPO / "recipes" / "others_t5_base.yaml").read_text()
    assert "NOT from a released run" in text
    jobs = {job.stage for job in plan(load_recipe("others_t5_base"))}
    assert jobs == {"winogrande", "yelp", "scitail", "paws"}


def test_command_line_overrides_beat_stage_values_and_reach_one_stage():
    recipe = load_recipe("quickstart", {"train.steps": "7", "train.warmup_steps": "1", "stages.transfer.k": "[4]"})
    jobs = plan(recipe)
    assert {j.config.train.steps for j in jobs} == {7}  # also the stages that set their own steps
    assert {j.config.data.k for j in jobs if j.stage == "transfer"} == {4}
    one = plan(load_recipe("quickstart", {"stages.transfer.train.steps": "9"}))
    assert {j.config.train.steps for j in one if j.stage == "transfer"} == {9}
    assert {j.config.train.steps for j in one if j.stage != "transfer"} != {9}


def test_transfer_jobs_all_start_from_their_stages_source_adapter():
    recipe = load_recipe("quickstart")
    transfer = [j for j in plan(recipe) if j.meta["type"] == "transfer"]
    for stage in {j.stage for j in transfer}:
        sources = {j.config.init_adapter for j in transfer if j.stage == stage and j.meta["start"] == "source"}
        assert len(sources) == 1 and next(iter(sources)).endswith(("best_adapter", "/adapter")), stage
    assert all(j.config.init_adapter is None for j in transfer if j.meta["start"] == "scratch")
    assert len({j.config.output_dir for j in transfer}) == len(transfer)
    from pipeline.mlflow_record import run_names

    names = [run_names(plan(recipe))[j.key] for j in transfer]
    assert len(set(names)) == len(names) and all(not n.startswith("transfer/") for n in names)


def test_input_paths_resolve_against_the_recipe_file(tmp_path, monkeypatch):
    """A recipe's custom task data and DeepSpeed config are found from any working directory."""
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "train.csv").write_text("text,stars\n" + "".join(f"good {i},5\nbad {i},1\n" for i in range(8)))
    (folder / "ds.json").write_text('{"zero_optimization": {"stage": 3}}')
    task = {
        "name": "stars",
        "data_files": {"train": "data/train.csv", "validation": "data/train.csv"},
        "input_columns": ["text"],
        "label_column": "stars",
        "label_words": {1: "negative", 5: "positive"},
        "metric": "accuracy",
    }
    (folder / "recipe.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "r",
                "model": "random:tiny-t5",
                "output_dir": "runs/r",
                "ds_config": "ds.json",
                "stages": [{"name": "a", "tasks": [task]}],
            }
        )
    )
    monkeypatch.chdir(tmp_path)  # not the recipe's folder
    recipe = load_recipe(str(folder / "recipe.yaml"))
    (job,) = plan(recipe)
    assert job.config.ds_config == str(folder / "ds.json")
    assert job.config.data.tasks[0]["data_files"]["train"] == str(folder / "data" / "train.csv")
    assert job.config.output_dir == str(Path("runs/r/a"))  # outputs: relative to the working directory


BAD = {
    "unknown top-level key": ({"output_dri": "x"}, "recipe.output_dri: unknown key (did you mean 'output_dir'?)"),
    "unknown nested key": ({"train": {"stpes": 3}}, "recipe.train.stpes: unknown key (did you mean 'steps'?)"),
    "wrong type": ({"train": {"steps": "many"}}, "recipe.train.steps: expected an integer, got 'many'"),
    "negative rate": ({"train": {"lr_prompt": -0.1}}, "recipe.train.lr_prompt: must be at least 0"),
    "stage wrong type": (
        {"stages": [{"name": "a", "tasks": ["rte"], "train": {"lr_prompt": "high"}}]},
        "recipe.stages[0] (a).train.lr_prompt: expected a number, got 'high'",
    ),
    "bad choice": (
        {"data": {"eval_mode": "scor"}},
        "recipe.data.eval_mode: 'scor' is not one of generate, score (did you mean 'score'?)",
    ),
    "missing stage input": ({"stages": [{"name": "a", "type": "train"}]}, "a train stage needs at least one task"),
    "transfer from missing stage": (
        {"stages": [{"name": "t", "type": "transfer", "source": "nope", "targets": ["rte"]}]},
        "'nope' is not an earlier stage",
    ),
    "no stages": ({"stages": []}, "recipe.stages: give a non-empty list"),
    "k not ints": (
        {"stages": [{"name": "t", "type": "transfer", "control": True, "targets": ["rte"], "k": ["x"]}]},
        "recipe.stages[0].k[0]: expected an integer, got 'x'",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipes_are_refused_with_the_key_path(case, tmp_path, capsys):
    change, expected = BAD[case]
    raw = {
        "name": "bad",
        "model": "random:tiny-t5",
        "output_dir": str(tmp_path / "out"),
        "stages": [{"name": "a", "tasks": ["rte"]}],
    }
    raw.update(change)
    with pytest.raises(PipelineError) as err:
        validate(raw, tmp_path)
    assert expected in str(err.value) and "\n" not in str(err.value)
    path = tmp_path / "bad.yaml"  # and through the CLI: exit 2, one line, nothing written
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path)]) == 2
    stderr = capsys.readouterr().err
    assert stderr.strip().count("\n") == 0 and expected in stderr
    assert not (tmp_path / "out").exists()


@needs_full_data("rte", "cb")  # RTE has 30 rows per class for k=60, CB's neutral class 16
def test_a_stage_that_cannot_run_is_refused_when_planned(tmp_path, capsys):
    """k-shot needs k // classes rows of each class: CB's train split has 16 'neutral' rows, so k = 60 fails at the
    start of the recipe (and in --dry_run), not after the jobs before it ran."""
    raw = {
        "name": "r",
        "model": "random:tiny-t5",
        "output_dir": str(tmp_path / "out"),
        "stages": [{"name": "t", "type": "transfer", "control": True, "targets": ["rte", "cb"], "k": [4, 60]}],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["run", str(path), "--dry_run"]) == 2
    err = capsys.readouterr().err
    assert "t/cb/k60" in err and "'2'" in err and "\n" not in err.strip()


def test_dry_run_does_not_import_torch():
    code = (
        "import sys; from pipeline.cli import main; rc = main(['run', 'quickstart', '--dry_run']); "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "recipe quickstart:" in proc.stdout


def test_unreachable_tracking_uri_fails_before_training(tmp_path, capsys):
    from conftest import free_port

    out = tmp_path / "out"
    rc = main(["run", "quickstart", f"--output_dir={out}", f"--tracking.uri=http://127.0.0.1:{free_port()}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unreachable" in err and err.strip().count("\n") == 0
    assert not out.exists()


def test_the_plan_shows_a_prompt_of_zero_tokens_as_zero():
    """m = 0 (DePT with the offset only) is a value, not the default; an unset m is the default."""
    jobs = plan(load_recipe("quickstart", {"dept.num_virtual_tokens": "0"}))
    shown = describe_plan(load_recipe("quickstart", {"dept.num_virtual_tokens": "0"}), jobs)
    assert "m=0 " in shown and "m=default" not in shown
    unset = load_recipe("quickstart")
    unset.spec.dept.pop("num_virtual_tokens", None)
    for stage in unset.spec.stages:
        stage.dept.pop("num_virtual_tokens", None)
    assert "m=default" in describe_plan(unset, plan(unset))
