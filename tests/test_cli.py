"""The command line is derived from the typed configuration: the same names everywhere, strict before anything runs
(unknown flags, stray words, bad values: one line, exit 2), help and version (fast, in-process)."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest

from pipeline.cli import CLI_ONLY_TRAIN, COMMANDS, known_flags, main
from pipeline.config import DataArgs, DeptArgs, JobConfig, LoraArgs, RecipeSpec, StageSpec, TrainArgs
from pipeline.options import flag_name

ALIASES = {"lora_rank": "r", "task": "tasks", "custom_task": "tasks", "mode": "eval_mode"}  # documented in --help
# method lora's flags: its section's fields behind a lora_ prefix (DePT's r, budget_tokens, lora_alpha are taken)
ALIASES.update(
    lora_r="r", lora_dropout="dropout", lora_targets="target_modules", lora_budget_tokens="budget_tokens",
    lora_budget_params="budget_params",
)  # fmt: skip


def names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_train_flags_recipe_keys_and_config_fields_are_one_set():
    flags, _ = known_flags(COMMANDS["train"])
    sections = {"dept", "lora", "train", "data"}
    fields = names(DeptArgs) | names(LoraArgs) | names(TrainArgs) | names(DataArgs) | (names(JobConfig) - sections)
    as_fields = {ALIASES.get(f, f) for f in flags} - set(CLI_ONLY_TRAIN)
    assert as_fields == fields
    # a recipe spells the same fields: run-level keys at the top or in a stage, the rest in its sections
    run_level = names(JobConfig) - sections
    recipe_run_keys = (names(RecipeSpec) | names(StageSpec)) & run_level
    assert recipe_run_keys == run_level - {"output_dir"} | {"output_dir"}
    assert sections <= names(RecipeSpec) & names(StageSpec)


def test_every_alias_is_documented_in_help(capsys):
    assert main(["train", "--help"]) == 0
    shown = capsys.readouterr().out
    for spec in dataclasses.fields(DeptArgs):
        assert f"--{flag_name(spec)}" in shown
    assert "--lora_rank is r" in shown and "--custom_task" in shown


@pytest.mark.parametrize("command", sorted(name for name, c in COMMANDS.items() if c.args is not None))
def test_help_names_only_flags_the_command_takes(command, capsys):
    """#22: `dept predict --help` listed --custom_task as an alias, and predict refused it."""
    assert main([command, "--help"]) == 0
    shown = capsys.readouterr().out
    flags, _ = known_flags(COMMANDS[command])
    named = set(re.findall(r"(?<![\w.-])--([a-z][a-z_]*)(?![\w.=-])", shown)) - {"flag"}
    assert named and named <= set(flags), named - set(flags)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command, capsys):
    assert main([command, "--help"]) == 0 and main([command, "-h"]) == 0
    assert "usage: dept" in capsys.readouterr().out


def test_version_and_overview(capsys):
    from pipeline import __version__

    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == f"dept-pipeline {__version__}"
    assert main([]) == 0 and "commands:" in capsys.readouterr().out


TRAIN = ["train", "--model", "random:tiny-t5", "--task", "rte", "--output_dir"]
BAD = {
    "typo'd flag": (["--learning_rate", "1e-4"], "unknown flag --learning_rate"),
    "near miss": (["--lr_promt", "0.1"], "did you mean 'lr_prompt'?"),
    "stray word": (["steps=10"], "unexpected word 'steps=10' (did you mean --steps=10?)"),
    "not a number": (["--steps", "ten"], "error: --steps: expected an integer, got 'ten'"),
    "bad choice": (["--prompt_init", "TXT"], "'TXT' is not one of TEXT, VOCAB, RANDOM (did you mean 'TEXT'?)"),
    "bad eval mode": (["--eval_mode", "scor"], "(did you mean 'score'?)"),
    "negative rate": (["--lr_prompt", "-0.1"], "--lr_prompt: must be at least 0, got -0.1"),
    "warmup never ends": (["--steps", "30"], "warmup_steps 500 >= steps 30"),
    "r with budget": (["--lora_rank", "4", "--budget_tokens", "100"], "give r (4) or budget_tokens (100), not both"),
    "pt with r": (["--method", "pt", "--lora_rank", "4"], "method pt is prompt tuning without a low-rank pair"),
    "unknown command flag value": (["--on_nonfinite", "ignore"], "'ignore' is not one of stop, skip"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_flags_are_refused_before_anything_runs(case, tmp_path, capsys):
    extra, expected = BAD[case]
    out = tmp_path / "out"
    assert main([*TRAIN, str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert expected in err and err.count("\n") == 1, err
    assert not out.exists()


def test_run_accepts_key_value_words_and_refuses_unknown_keys(tmp_path, capsys):
    assert main(["run", "quickstart", "train.steps=3", "train.warmup_steps=1", "--dry_run"]) == 0
    assert "steps=3" in capsys.readouterr().out
    assert main(["run", "quickstart", "train.stpes=3", "--dry_run"]) == 2
    assert "recipe.train.stpes: unknown key (did you mean 'steps'?)" in capsys.readouterr().err
    assert main(["run", "quickstart", "--dry_runn"]) == 2
    assert "did you mean 'dry_run'?" in capsys.readouterr().err
    assert main(["run", "quickstart", "extra", "--dry_run"]) == 2
    assert "unexpected word 'extra'" in capsys.readouterr().err


def test_run_overrides_reach_stages_whose_names_hold_a_hyphen(capsys):
    # fire would rewrite `source-pt` to `source_pt` (a stage that does not exist): overrides bypass its flag parser
    assert (
        main(["run", "quickstart", "--stages.source-pt.train.steps=70", "stages.transfer-pt.k=[8]", "--dry_run"]) == 0
    )
    plan = capsys.readouterr().out
    assert re.search(r"source-pt .*steps=70 ", plan) and re.search(r"transfer-pt .*k \[8\];", plan), plan
    assert re.search(r"source \(.*steps=300 ", plan), plan  # the other stages keep their own values
    assert main(["run", "quickstart", "--stages.source-pz.train.steps=70", "--dry_run"]) == 2
    assert "no stage 'source-pz' (did you mean 'source-pt'?)" in capsys.readouterr().err


def test_unknown_command_is_refused(capsys):
    assert main(["trian"]) == 2
    assert "did you mean 'train'?" in capsys.readouterr().err


def test_a_batch_the_ranks_cannot_split_is_refused_at_planning(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert main(["run", "quickstart", "--dry_run"]) == 2
    assert "not divisible by world size 3" in capsys.readouterr().err


def test_a_missing_positional_is_one_line(capsys):
    assert main(["import-adapter", "only-the-source"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: import-adapter: missing OUT (usage: dept import-adapter SRC OUT)"


def test_tracking_errors_name_flags_dept_run_has(tmp_path, monkeypatch):
    """The tracking store's errors tell the user which `dept run` flag to change: each flag they name is one the
    command accepts."""
    from pipeline.cli import parse
    from pipeline.errors import PipelineError
    from pipeline.tracking import Tracker, check_reachable

    messages = []
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    blocker = tmp_path / "file"
    blocker.write_text("")
    for call in (
        lambda: check_reachable(f"sqlite:///{blocker}/sub/mlflow.db"),  # cannot create the directory
        lambda: Tracker(f"sqlite:///{tmp_path}/x.db", " "),  # empty experiment name
    ):
        with pytest.raises(PipelineError) as caught:
            call()
        messages.append(str(caught.value))
    if os.geteuid() != 0:  # root writes anywhere
        with pytest.raises(PipelineError) as caught:
            check_reachable(f"sqlite:///{locked}/mlflow.db")
        messages.append(str(caught.value))
    for message in messages:
        flags = re.findall(r"--[\w.]+", message)
        assert flags, message
        for flag in flags:
            parse(["run", "quickstart", f"{flag}=x"])  # raises on an unknown flag


def test_fire_dispatches_the_command_with_values_parsed_once(monkeypatch, capsys):
    """fire runs the command table; it is handed values already parsed by our rules (`True` stays text for a
    string flag, as in a recipe's YAML), never re-parsing them by its Python-literal rules."""
    import fire

    from pipeline import cli

    seen, dispatched = {}, []
    real_fire = fire.Fire

    def spy(component, command=None, name=None):
        dispatched.append((sorted(component), command, name))
        return real_fire(component, command=command, name=name)

    monkeypatch.setattr(cli.fire, "Fire", spy)
    monkeypatch.setitem(
        cli.COMMANDS, "run", dataclasses.replace(cli.COMMANDS["run"], function=lambda *a, **k: seen.update(k))
    )
    assert cli.main(["run", "quickstart", "--dept.init_text", "True", "train.steps=7"]) == 0
    assert dispatched == [(["run"], ["run"], "dept")]
    assert seen == {"dept.init_text": "True", "train.steps": "7"}
