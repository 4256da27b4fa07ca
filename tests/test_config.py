"""The typed configuration: values coerced and checked with their key path, cross-field rules, and the quick-try
caps (DEPT_MAX_STEPS, DEPT_MAX_EVAL_ROWS)."""

from __future__ import annotations

import pytest

from pipeline.config import JobConfig, TrainArgs, capped
from pipeline.errors import PipelineError
from pipeline.options import build, check_partial, coerce


def job(**sections) -> JobConfig:
    return build(JobConfig, {"model": "m", "output_dir": "o", "data": {"tasks": ["rte"]}, **sections}, "job")


def test_values_are_coerced_from_text_and_yaml():
    assert coerce("10", int, "x") == 10 and coerce(1.0, int, "x") == 1 and coerce("1e-4", float, "x") == 1e-4
    assert coerce("[4, 16]", list[int], "x") == [4, 16] and coerce("rte,cb", list[str], "x") == ["rte", "cb"]
    assert coerce("null", int | None, "x") is None and coerce("text", str, "x") == "text"
    assert coerce("False", bool, "x") is False and coerce("yes", bool, "x") is True


@pytest.mark.parametrize(
    "value,tp,message",
    [
        ("ten", int, "x: expected an integer, got 'ten'"),
        (2.5, int, "x: expected an integer, got 2.5"),
        (True, float, "x: expected a number, got True"),
        ("maybe", bool, "x: expected true or false, got 'maybe'"),
        (None, int, "x: null is not allowed here"),
    ],
)
def test_bad_values_name_their_key(value, tp, message):
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        coerce(value, tp, "x")


def test_unknown_keys_get_a_did_you_mean_and_partial_sections_are_checked():
    with pytest.raises(PipelineError, match=r"job.train.lr_promt: unknown key \(did you mean 'lr_prompt'\?\)"):
        job(train={"lr_promt": 0.1})
    assert check_partial(TrainArgs, {"steps": "5"}, "recipe.train") == {"steps": 5}
    with pytest.raises(PipelineError, match="recipe.train.steps: must be at least 1, got 0"):
        check_partial(TrainArgs, {"steps": 0}, "recipe.train")


def test_cross_field_rules():
    with pytest.raises(PipelineError, match="warmup_steps 500 >= steps 100"):
        job(train={"steps": 100})
    with pytest.raises(PipelineError, match="give r \\(4\\) or budget_tokens \\(100\\), not both"):
        job(dept={"r": 4, "budget_tokens": 100})
    with pytest.raises(PipelineError, match="a job needs data"):
        build(JobConfig, {"model": "m", "output_dir": "o"}, "job")
    assert job(train={"steps": 100, "warmup_steps": 10}).train.steps == 100


def test_quick_try_caps_shrink_the_schedule_and_evaluation(monkeypatch):
    cfg = job(train={"steps": 300, "warmup_steps": 30, "eval_every": 100, "save_every": 50}, data={"tasks": ["rte"]})
    assert capped(cfg) is cfg  # no variables: unchanged
    monkeypatch.setenv("DEPT_MAX_STEPS", "12")
    monkeypatch.setenv("DEPT_MAX_EVAL_ROWS", "16")
    small = capped(cfg)
    assert (small.train.steps, small.train.warmup_steps, small.train.eval_every, small.train.save_every) == (
        12,
        1,
        4,
        2,
    )
    assert small.data.max_eval_rows == 16
    monkeypatch.setenv("DEPT_MAX_STEPS", "0")
    with pytest.raises(PipelineError, match="DEPT_MAX_STEPS=0: give a positive number"):
        capped(cfg)
