"""Sweeps (#19), fast and in-process: the `sweep:` block's one-line errors, grid and paired expansion, trial keys and
fingerprints, sampled (TPE) trials persisted in the Optuna study (the same trials on re-plan), the best trial on
validation, the Optuna record of a trial (reports, pruning, resume), the summary's trials table and sweep.png. The
2 x 2 sweep on stories260K is tests/test_sweep_runs.py."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from pipeline import sweep
from pipeline.errors import PipelineError
from pipeline.fingerprint import job_fingerprint
from pipeline.recipe import Job, Recipe, describe_plan, plan, validate
from pipeline.summary import summarize

BASE = {
    "name": "sw",
    "model": "stories260K",
    "ds_config": "zero3_cpu",
    "dept": {"num_virtual_tokens": 4, "r": 1, "max_length": 64},
    "train": {"batch_size": 4, "steps": 10, "warmup_steps": 1, "eval_every": 5},
}


def recipe(tmp_path: Path, source_sweep, **stage) -> Recipe:
    raw = {
        **BASE,
        "output_dir": str(tmp_path / "out"),
        "stages": [
            {"name": "source", "tasks": ["stories-animal"], "sweep": source_sweep, **stage},
            {
                "name": "transfer",
                "type": "transfer",
                "source": "source",
                "targets": ["stories-had"],
                "k": [8],
                "seeds": [1],
            },
        ],
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return Recipe(validate(raw, tmp_path), path)


@pytest.mark.parametrize(
    ("block", "stage", "message"),
    [
        ({"train.lr_promt": [0.3]}, {}, r"train has no key 'lr_promt'.*did you mean 'lr_prompt'"),
        ({"optimizer.lr": [0.3]}, {}, r"'optimizer.lr' is not a config key; sweep dotted keys"),
        ({"trails": 4}, {}, r"'trails' is not a config key.*did you mean 'trials'"),
        ({"train.lr": [1e-4]}, {}, r"'train.lr' is not a training key of a dept stage \(read by finetune\)"),
        ({"train.lr_lowrank": [1e-4]}, {"method": "pt"}, r"not a training key of a pt stage"),
        ({"train.log_every": [1, 2]}, {}, r"does not change a job's result"),
        ({"data.k": [4, 8]}, {}, r"the stage's own"),
        ({"train.lr_prompt": []}, {}, r"give a non-empty list of values"),
        ({"train.lr_prompt": 0.3}, {}, r"give a non-empty list of values"),
        ({"train.lr_prompt": [0.3, "fast"]}, {}, r"sweep.train.lr_prompt: expected a number, got 'fast'"),
        ({"train.lr_prompt": [0.3, 0.3]}, {}, r"listed twice"),
        ({"paired": {"train.lr_prompt": [0.3, 0.4], "train.lr_lowrank": [1e-4]}}, {}, r"equally long"),
        ({"method": "tpe", "space": {"train.lr_prompt": {"low": 0.01, "high": 1}}}, {}, r"needs trials: N"),
        ({"method": "tpe", "trials": 3, "space": {"train.lr_prompt": {"low": 1, "high": 0.1}}}, {}, r"must be below"),
        (
            {"method": "tpe", "trials": 3, "space": {"train.lr_prompt": {"low": 0, "high": 1, "log": True}}},
            {},
            "low > 0",
        ),
        ({"method": "tpe", "trials": 3, "train.lr_prompt": [0.3]}, {}, r"takes its keys from space"),
        ({"train.lr_prompt": [0.3], "trials": 3}, {}, r"only a sampled sweep has trials; add method: tpe"),
        ({"method": "bayes", "train.lr_prompt": [0.3]}, {}, r"'bayes' is not one of grid, tpe, random"),
        ({"prune": "hyperband", "train.lr_prompt": [0.3]}, {}, r"not one of none, median, successive_halving"),
        ({}, {}, r"give a mapping of keys to values"),
        ({"prune": "median"}, {}, r"name at least one key to sweep"),
        ({"train.lr_prompt": [0.3]}, {"data": {"evaluate": False}}, r"picks its best trial on validation"),
        ({"train.lr": [1e-4, 1e-3]}, {"method": "finetune", "save_model": True}, r"remove save_model"),
    ],
)
def test_bad_sweep_blocks_fail_with_one_line_naming_the_key_and_fix(tmp_path, block, stage, message):
    with pytest.raises(PipelineError, match=message) as err:
        recipe(tmp_path, block, **stage)
    assert "\n" not in str(err.value) and "recipe.stages[0] (source).sweep" in str(err.value)


def test_a_transfer_stage_is_not_swept(tmp_path):
    raw = {
        **BASE,
        "output_dir": str(tmp_path),
        "stages": [
            {"name": "source", "tasks": ["stories-animal"]},
            {
                "name": "t",
                "type": "transfer",
                "source": "source",
                "targets": ["stories-had"],
                "sweep": {"train.seed": [1]},
            },
        ],
    }
    with pytest.raises(PipelineError, match=r"a transfer stage is not swept; sweep its source stage"):
        validate(raw, tmp_path)


def test_grid_is_the_cartesian_product_in_a_stable_order_and_paired_keys_move_together():
    grid = sweep.parse({"train.lr_prompt": [0.3, 0.4], "train.lr_lowrank": [1e-4, 5e-4, 1e-3]}, "dept", "s")
    settings = sweep.grid_settings(grid)
    assert len(settings) == 6 and settings[0] == {"train.lr_prompt": 0.3, "train.lr_lowrank": 1e-4}
    assert [s["train.lr_lowrank"] for s in settings[:3]] == [1e-4, 5e-4, 1e-3]  # the last key varies fastest
    # YAML 1.1 reads 1e-4 as text: values are checked and typed as the key's field
    assert sweep.parse({"train.lr_lowrank": ["1e-4"]}, "dept", "s").grid == {"train.lr_lowrank": [1e-4]}
    paired = sweep.parse(
        {"paired": {"train.lr_prompt": [0.3, 0.4], "train.lr_lowrank": [1e-4, 5e-3]}, "train.seed": [1, 2]}, "dept", "s"
    )
    assert sweep.grid_settings(paired) == [
        {"train.lr_prompt": 0.3, "train.lr_lowrank": 1e-4, "train.seed": 1},
        {"train.lr_prompt": 0.3, "train.lr_lowrank": 1e-4, "train.seed": 2},
        {"train.lr_prompt": 0.4, "train.lr_lowrank": 5e-3, "train.seed": 1},
        {"train.lr_prompt": 0.4, "train.lr_lowrank": 5e-3, "train.seed": 2},
    ]
    nested = sweep.parse(
        {"train": {"lr_prompt": [0.3, 0.4]}}, "dept", "s"
    )  # what --stages.x.sweep.train.lr_prompt= builds
    assert nested.grid == {"train.lr_prompt": [0.3, 0.4]}


def test_each_trial_is_an_ordinary_job_with_its_own_key_folder_and_fingerprint(tmp_path):
    r = recipe(tmp_path, {"train.lr_prompt": [0.3, 0.4], "train.lr_lowrank": [1e-4, 5e-3]})
    jobs = plan(r)
    trials = [j for j in jobs if j.stage == "source"]
    assert [j.key for j in trials] == [
        "source/stories-animal/lr_prompt=0.3,lr_lowrank=0.0001",
        "source/stories-animal/lr_prompt=0.3,lr_lowrank=0.005",
        "source/stories-animal/lr_prompt=0.4,lr_lowrank=0.0001",
        "source/stories-animal/lr_prompt=0.4,lr_lowrank=0.005",
    ]
    assert all(isinstance(j, Job) and j.meta["type"] == "train" for j in trials)
    assert [(j.config.train.lr_prompt, j.config.train.lr_lowrank) for j in trials] == [
        (0.3, 1e-4),
        (0.3, 5e-3),
        (0.4, 1e-4),
        (0.4, 5e-3),
    ]
    assert len({j.config.output_dir for j in trials}) == 4
    assert all(Path(j.config.output_dir).parent == tmp_path / "out" / "source" / "stories-animal" for j in trials)
    assert len({job_fingerprint(j.config)[0] for j in trials}) == 4
    transfer = next(j for j in jobs if j.stage == "transfer")  # starts from the winner, copied to best_adapter
    assert transfer.config.init_adapter == str(tmp_path / "out" / "source" / "best_adapter")
    assert transfer.init_from_stage == "source"
    shown = describe_plan(r, jobs)
    assert "sweep (grid) over train.lr_prompt, train.lr_lowrank: 4 trial(s)" in shown
    assert "train.lr_prompt=0.4, train.lr_lowrank=0.005" in shown
    # a wider grid keeps the old trials' keys (their folders and results are reused)
    wider = plan(recipe(tmp_path, {"train.lr_prompt": [0.3, 0.4, 0.5], "train.lr_lowrank": [1e-4, 5e-3]}))
    assert {j.key for j in trials} < {j.key for j in wider}


def test_sampled_trials_are_drawn_once_and_read_back_from_the_study(tmp_path):
    block = {
        "method": "tpe",
        "trials": 3,
        "seed": 7,
        "space": {"train.lr_prompt": {"low": 0.01, "high": 1.0, "log": True}, "train.warmup_steps": [0, 2]},
    }
    r = recipe(tmp_path, block)
    dry = [j.meta["sweep"] for j in plan(r, persist=False) if j.stage == "source"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    first = [j for j in plan(r) if j.stage == "source"]
    assert [j.key for j in first] == [f"source/stories-animal/trial{i}" for i in range(3)]
    assert [j.meta["sweep"] for j in first] == dry  # the dry run showed the trials the run draws
    assert all(0.01 <= j.config.train.lr_prompt <= 1.0 and j.config.train.warmup_steps in (0, 2) for j in first)
    again = [j.meta["sweep"] for j in plan(r) if j.stage == "source"]
    assert again == [j.meta["sweep"] for j in first]  # read back, not drawn again
    more = [j.meta["sweep"] for j in plan(recipe(tmp_path, {**block, "trials": 5})) if j.stage == "source"]
    assert more[:3] == again and len(more) == 5
    study = optuna.load_study(
        study_name="dept.sw.source",
        storage=sweep.storage_of(sweep.parse(block, "dept", "s"), tmp_path / "out" / "source"),
    )
    assert sorted(t.user_attrs["dept.index"] for t in study.trials) == [0, 1, 2, 3, 4]


def results_of(scores: dict[str, tuple]) -> dict[str, dict]:
    return {
        key: {
            "best_validation": val,
            "best_step": 5,
            "test_score": test,
            "stopped_early": {"step": 5} if pruned else None,
        }
        for key, (val, test, pruned) in scores.items()
    }


def test_the_best_trial_is_chosen_on_validation_never_pruned_ties_to_the_earlier(tmp_path):
    trials = [j for j in plan(recipe(tmp_path, {"train.lr_prompt": [0.1, 0.2, 0.3, 0.4]})) if j.stage == "source"]
    a, b, c, d = (j.key for j in trials)
    # c has the best test score but not the best validation; d's validation is highest but it was pruned
    results = results_of(
        {a: (40.0, 41.0, False), b: (62.5, 55.0, False), c: (62.5, 70.0, False), d: (90.0, 90.0, True)}
    )
    assert sweep.best_trial(trials, results) is trials[1]
    assert sweep.best_trial(trials, results_of({a: (None, None, False), b: (5.0, 1.0, True)})) is None
    rows = sweep.trial_rows(trials, results)
    assert [r["winner"] for r in rows] == [False, True, False, False] and rows[3]["pruned_at"] == 5

    stage_dir = tmp_path / "out" / "source"
    for job in trials:  # each trial's best adapter, told apart by its weights' checksum
        adapter = Path(job.config.output_dir) / "best_adapter"
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text(f'{{"weights_sha256": "{job.key}"}}')
        (adapter / "adapter_model.safetensors").write_text(job.key)
    best = sweep.finish_stage("source", trials, results, stage_dir)
    assert best["winner"] == b and best["best_validation"] == 62.5 and best["test_score"] == 55.0
    assert sweep.read_best(stage_dir)["winner"] == b
    assert (stage_dir / "best_adapter" / "adapter_model.safetensors").read_text() == b
    with pytest.raises(PipelineError, match="no trial of its sweep has a validation score"):
        sweep.finish_stage("source", trials, results_of({a: (None, None, False)}), stage_dir)

    jobs = [*trials]
    summary = summarize("sw", jobs, {k: {**v, "test": {"accuracy": v["test_score"]}} for k, v in results.items()})
    assert [s["key"] for s in summary["sources"]] == [b]  # the stage's result is its winner
    (table,) = summary["sweeps"]
    assert table["winner"] == b and len(table["trials"]) == 4
    assert "## source: sweep over train.lr_prompt (best on validation: lr_prompt=0.2)" in summary["markdown"]
    assert "| 0.2 | **62.5** (best) | 5 | - | 55.0 |" in summary["markdown"]
    assert "| 0.4 | 90.0 | 5 | at step 5 | 90.0 |" in summary["markdown"]


def test_a_trial_reports_to_its_optuna_record_is_pruned_by_the_median_and_resumes_its_record(tmp_path):
    block = {"train.lr_prompt": [0.1, 0.2, 0.3], "prune": "median"}
    r = recipe(tmp_path, block)
    trials = [j for j in plan(r) if j.stage == "source"]
    swept = sweep.parse(block, "dept", "s")
    study = sweep.open_study(swept, "dept.sw.source", tmp_path / "out" / "source")
    for job, curve in zip(trials[:2], ([50.0, 60.0], [40.0, 70.0])):
        record = sweep.TrialRecord(study, swept, job, "fp")
        for step, score in zip((5, 10), curve):
            record.report(step, score)
            assert not record.should_prune()  # fewer than 2 finished trials: nothing to compare with
        record.finish({"best_validation": max(curve)})
    hooks = sweep.TrialHooks(sweep.TrialRecord(study, swept, trials[2], "fp"), prune=True)
    assert hooks.should_stop(5, 10.0) and "MedianPruner" in hooks.should_stop(5, 10.0)
    # an interrupted trial finds its open record again (same fingerprint); a changed one gets a new record
    again = sweep.TrialRecord(study, swept, trials[2], "fp")
    assert again.number == hooks.record.number and again.trial.study.trials[again.number].intermediate_values == {
        5: 10.0
    }
    again.finish({"best_validation": 10.0, "stopped_early": {"step": 5, "reason": "pruned"}})
    states = [
        t.state
        for t in optuna.load_study(
            study_name="dept.sw.source", storage=sweep.storage_of(swept, tmp_path / "out" / "source")
        ).trials
    ]
    assert states == [optuna.trial.TrialState.COMPLETE] * 2 + [optuna.trial.TrialState.PRUNED]
    changed = sweep.TrialRecord(study, swept, trials[2], "other-fingerprint")
    assert changed.number == 3 and changed.trial.params == {"train.lr_prompt": 0.3}


def test_sweep_png_is_a_heat_map_of_a_grid_and_a_log_scatter_of_a_sampled_sweep(tmp_path):
    from pipeline.plots import plot_sweeps

    def rows(points):
        return [
            {
                "setting": str(v),
                "values": v,
                "best_validation": s,
                "best_step": 5,
                "pruned_at": p,
                "test_score": s,
                "winner": w,
            }
            for v, s, p, w in points
        ]

    grid = {
        "stage": "source",
        "keys": ["train.lr_prompt", "train.lr_lowrank"],
        "trials": rows(
            [
                ({"train.lr_prompt": a, "train.lr_lowrank": b}, 10.0 * i, 5 if i == 0 else None, i == 3)
                for i, (a, b) in enumerate([(0.3, 1e-4), (0.3, 5e-3), (0.4, 1e-4), (0.4, 5e-3)])
            ]
        ),
    }
    sampled = {
        "stage": "tpe",
        "keys": ["train.lr_prompt", "train.lr_lowrank"],
        "trials": rows(
            [({"train.lr_prompt": 0.01 * 3**i, "train.lr_lowrank": 1e-5 * 4**i}, i, None, i == 2) for i in range(3)]
        ),
    }
    one_key = {
        "stage": "one",
        "keys": ["train.lr_prompt"],
        "trials": rows([({"train.lr_prompt": 0.1}, 1.0, None, True)]),
    }
    path = plot_sweeps([grid, sampled, one_key], tmp_path / "sweep.png")
    assert path.stat().st_size > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(path).shape[1] > 3 * 500  # three panels side by side
    with pytest.raises(ValueError, match="no swept stage"):
        plot_sweeps([], tmp_path / "none.png")


def test_sweep_paper_gives_every_train_stage_the_authors_grid(monkeypatch):
    from pipeline.recipe import load_recipe

    monkeypatch.delenv("DEPT_DATA_DIR", raising=False)
    jobs = plan(load_recipe("glue_t5_base", {"sweep": "paper"}), persist=False)
    rte = [j for j in jobs if j.stage == "rte"]
    assert len(jobs) == 8 * 8 and len(rte) == 8
    assert {(j.config.train.lr_prompt, j.config.train.lr_lowrank) for j in rte} == {
        (p, a) for p in (0.3, 0.4) for a in (1e-4, 5e-4, 1e-3, 5e-3)
    }
    assert {j.config.train.steps for j in rte} == {30_000}  # the stage's own settings stay
    with pytest.raises(PipelineError, match=r"recipe.sweep: 'papr' is not a named sweep.*did you mean 'paper'"):
        load_recipe("glue_t5_base", {"sweep": "papr"})


def test_a_study_storage_url_holds_the_sampled_trials_for_every_machine(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    block = {"method": "random", "trials": 2, "seed": 1, "space": {"train.lr_prompt": {"low": 0.1, "high": 1.0}}}
    first = [j.meta["sweep"] for j in plan(recipe(tmp_path, {**block, "storage": url})) if j.stage == "source"]
    assert not (tmp_path / "out" / "source" / "sweep.journal").exists()
    assert [t.params for t in optuna.load_study(study_name="dept.sw.source", storage=url).trials] == first
    monkeypatch.setenv(sweep.STORAGE_ENV, url)  # the environment names the same storage: the same trials
    assert [j.meta["sweep"] for j in plan(recipe(tmp_path, block)) if j.stage == "source"] == first


def test_dept_train_sweep_is_a_one_stage_recipe_of_the_same_job(tmp_path, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.config import JobConfig
    from pipeline.options import from_flags
    from pipeline.recipe import load_recipe, train_as_recipe

    monkeypatch.chdir(tmp_path)
    flags = {"model": "stories260K", "task": "stories-animal", "output_dir": "runs/t", "steps": 10, "warmup_steps": 1}
    cfg = from_flags(JobConfig, {**flags, "num_virtual_tokens": 4, "lora_rank": 1}, "")
    path = tmp_path / "runs" / "t" / "sweep_recipe.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(train_as_recipe(cfg, "paper"), sort_keys=False))
    jobs = plan(load_recipe(str(path)), persist=False)
    assert len(jobs) == 8 and jobs[0].key == "train/stories-animal/lr_prompt=0.3,lr_lowrank=0.0001"
    assert Path(jobs[0].config.output_dir) == tmp_path / "runs" / "t" / jobs[0].key
    assert all(j.config.train.steps == 10 and j.config.dept.num_virtual_tokens == 4 for j in jobs)
    with pytest.raises(PipelineError, match="--sweep with --k"):
        train_as_recipe(from_flags(JobConfig, {**flags, "k": 4}, ""), "paper")
    args = [f"--{k}={v}" for k, v in flags.items()]
    assert main(["train", *args, "--sweep={train.lr_promt: [0.3]}"]) != 0  # the sweep's keys are checked
    assert "did you mean 'lr_prompt'" in capsys.readouterr().err
