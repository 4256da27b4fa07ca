"""What a job is refused for before anything loads (preflight.py): a batch the ranks cannot split, an init
adapter that is missing or whose shape contradicts the job's (the same rule train.py applies: one sentence).
Every bad input from the command line: tests/test_bad_inputs.py."""

from __future__ import annotations

import json

from support import raises_one_line

from pipeline.config import JobConfig, micro_batch_size
from pipeline.options import build
from pipeline.preflight import check_batch, check_init_adapter


def job(tmp_path, **raw) -> JobConfig:
    return build(
        JobConfig,
        {"model": "random:tiny-t5", "output_dir": str(tmp_path / "o"), "data": {"tasks": ["rte"]}, **raw},
        "job",
    )


def test_the_batch_must_split_over_ranks_and_accumulation(tmp_path):
    assert micro_batch_size(32, 2, 4) == 4
    cfg = job(tmp_path, train={"batch_size": 12, "grad_accum": 2, "steps": 10, "warmup_steps": 1})
    check_batch(cfg, 2)
    raises_one_line(
        "batch_size 12 is not divisible by world size 4 x grad_accum 2: choose a multiple of 8", check_batch, cfg, 4
    )


def test_an_init_adapter_must_exist_and_agree_with_the_given_shape(tmp_path):
    raises_one_line("does not exist", check_init_adapter, job(tmp_path, init_adapter=str(tmp_path / "none")))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"num_virtual_tokens": 8, "r": 2, "max_length": 32}))
    check_init_adapter(job(tmp_path, init_adapter=str(adapter)))  # no explicit shape: the adapter's is taken
    raises_one_line(
        "has num_virtual_tokens=8 but 4 was given: drop num_virtual_tokens",
        check_init_adapter,
        job(tmp_path, init_adapter=str(adapter), dept={"num_virtual_tokens": 4}),
    )
    raises_one_line(
        "has max_length s=32 (rows of A) but 16 was given",
        check_init_adapter,
        job(tmp_path, init_adapter=str(adapter), dept={"max_length": 16}),
    )
