"""The typed configuration (config.py): cross-field rules, the table of what each method reads, and the quick-try
caps (DEPT_MAX_STEPS, DEPT_MAX_EVAL_ROWS). How values are parsed and checked: tests/test_options.py."""

from __future__ import annotations

import pytest

from pipeline.config import JobConfig, capped
from pipeline.errors import PipelineError
from pipeline.options import build


def job(**sections) -> JobConfig:
    return build(JobConfig, {"model": "m", "output_dir": "o", "data": {"tasks": ["rte"]}, **sections}, "job")


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
