"""The option machinery (options.py): values parsed once by their field's type from text or YAML, errors that name
the key or flag in one line with a "did you mean", partial sections checked without cross-field rules."""

from __future__ import annotations

import pytest

from pipeline.config import JobConfig, TrainArgs
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


def test_each_value_is_parsed_once_by_the_flags_own_type(tmp_path):
    """No second parser between the command line and the dataclass: text that reads as a bool, a number or a list
    elsewhere stays text in a text flag; a list flag splits on commas or reads YAML."""
    from pipeline.cli import parse
    from pipeline.options import from_flags

    _, _, values = parse(["train", "--model", "123", "--task", "rte,cb", "--output_dir", str(tmp_path)])
    cfg = from_flags(JobConfig, {**values, "init_text": "True", "steps": "1e3", "warmup_steps": "10"}, "")
    assert cfg.model == "123" and cfg.data.tasks == ["rte", "cb"] and cfg.dept.init_text == "True"
    assert cfg.train.steps == 1000 and isinstance(cfg.train.steps, int)
