"""The training loop in-process (one rank, a real ZeRO-3 engine): the DePT shape it resolves, two learning rates on
their schedule, the global batch order, what it returns; and kill-free resume from a checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from pipeline.config import JobConfig
from pipeline.data import global_batch, read_source_target
from pipeline.dept import DeptConfig
from pipeline.engine import ONE_THREAD_BELOW_PARAMS, cpu_threads, warmup_then_linear_decay
from pipeline.errors import PipelineError
from pipeline.options import build
from pipeline.train import resolve_shape, train


def job(tmp_path, data, name="out", **train_args) -> JobConfig:
    steps = train_args.pop("steps", 8)
    return build(
        JobConfig,
        {
            "model": "random:tiny-t5",
            "output_dir": str(tmp_path / name),
            "data": {"train_file": str(data)},
            "dept": {"num_virtual_tokens": 4, "r": 2, "max_length": 16},
            "train": {
                "batch_size": 4,
                "steps": steps,
                "warmup_steps": 2,
                "log_every": 1,
                "lr_lowrank": 0.01,
                **train_args,
            },
        },
        "job",
    )


def shape_of(tmp_path, method="dept", **dept) -> JobConfig:
    return build(
        JobConfig,
        {"model": "m", "output_dir": str(tmp_path), "method": method, "data": {"tasks": ["rte"]}, "dept": dept},
        "job",
    )


def test_shape_defaults_budget_and_pt(tmp_path):
    assert (
        resolve_shape(shape_of(tmp_path), 768, None)[0].to_dict()
        == DeptConfig(num_virtual_tokens=60, r=30, max_length=256, d_model=768).to_dict()
    )
    assert resolve_shape(shape_of(tmp_path, num_virtual_tokens=40, budget_tokens=100), 768, None)[0].r == 45
    assert resolve_shape(shape_of(tmp_path, "pt", num_virtual_tokens=100), 768, None)[0].r == 0


def test_an_init_adapters_shape_is_the_default_and_a_conflicting_value_is_refused(tmp_path):
    cola = DeptConfig(num_virtual_tokens=80, r=15, max_length=256, d_model=768)
    shape, notes = resolve_shape(shape_of(tmp_path), 768, cola)
    assert (shape.num_virtual_tokens, shape.r, shape.max_length) == (80, 15, 256)
    assert notes == ["shape from the init adapter: m=80, r=15, s=256"]
    with pytest.raises(PipelineError, match="has num_virtual_tokens=80 but 60 was given: drop num_virtual_tokens"):
        resolve_shape(shape_of(tmp_path, num_virtual_tokens=60), 768, cola)
    assert resolve_shape(shape_of(tmp_path, num_virtual_tokens=80, r=15), 768, cola)[0].r == 15


def test_the_global_batch_is_a_function_of_the_step_only():
    first = [global_batch(50, 8, step, seed=3) for step in range(12)]
    assert first == [global_batch(50, 8, step, seed=3) for step in range(12)]
    epoch = [i for batch in first[:6] for i in batch]  # 50 // 8 = 6 batches per epoch, no row twice
    assert len(set(epoch)) == 48
    assert first[6] != first[0]  # the next epoch reshuffles
    assert global_batch(3, 8, 0, seed=1).count(0) >= 2  # fewer rows than a batch: repeated to fill it


def test_the_ranks_split_every_global_batch_without_overlap():
    from pipeline.train import rank_micro_batches

    ids = list(range(100, 124))  # a global batch of 24 rows, 2 ranks x 3 accumulation steps of 4
    parts = {rank: rank_micro_batches(ids, rank, 2, 3) for rank in (0, 1)}
    assert parts[0] == [[100, 101, 102, 103], [108, 109, 110, 111], [116, 117, 118, 119]]
    assert sorted(i for rank in parts.values() for micro in rank for i in micro) == ids
    assert rank_micro_batches(ids, 0, 1, 1) == [ids]


def test_one_rank_trains_two_rates_on_their_schedule(tmp_path, toy_task):
    cfg = job(tmp_path, toy_task, steps=8)
    result = train(cfg, read_source_target(toy_task))
    factor = warmup_then_linear_decay(2, 8)
    for record in result.history:
        step = record["step"] - 1  # the rate applied at that step
        assert record["lr_prompt"] == pytest.approx(0.3 * factor(step))
        assert record["lr_lowrank"] == pytest.approx(0.01 * factor(step))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert sorted(result.trainable_names) == ["prompt.lora_A", "prompt.lora_B", "prompt.prompt"]
    assert result.dept_shape["num_virtual_tokens"] == 4 and result.world_size == 1
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
    assert torch.get_num_threads() == 1  # a tiny backbone trains on one thread unless asked otherwise (#22)


def test_the_thread_default_follows_the_model_size_and_the_cores_per_rank(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setattr("os.getloadavg", lambda: (0.3, 0.2, 0.1))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    big = ONE_THREAD_BELOW_PARAMS
    assert cpu_threads(None, 260_000) == 1 and cpu_threads(None, big) == 4 and cpu_threads(3, 260_000) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # launch.sh's share, or the user's
    assert cpu_threads(None, big) == 2 and cpu_threads(None, 260_000) == 1
    monkeypatch.setattr("os.getloadavg", lambda: (15.2, 9.0, 4.0))  # a busy machine: one core left idle
    assert cpu_threads(None, big) == 1 and cpu_threads(6, big) == 6


def test_a_job_resumes_from_its_checkpoint_to_the_uninterrupted_result(tmp_path, toy_task):
    """Resume without killing anything: a copy of the uninterrupted job's step-3 checkpoint, continued."""
    rows = read_source_target(toy_task)
    full = train(job(tmp_path, toy_task, "full", save_every=3, keep_checkpoints=5), rows)
    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000003", resumed_dir / "checkpoints" / "step-00000003")
    (resumed_dir / "checkpoints" / "latest").write_text("step-00000003\n")
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    (resumed_dir / "metrics.jsonl").write_text("\n".join(lines[:5]) + "\n")  # logged past the checkpoint: dropped
    resumed = train(job(tmp_path, toy_task, "resumed", save_every=3, keep_checkpoints=5), rows)
    assert [h["step"] for h in resumed.history] == list(range(1, 9))
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-6)
    from pipeline.adapters import read_adapter

    a, b = read_adapter(tmp_path / "full" / "adapter")[1], read_adapter(resumed_dir / "adapter")[1]
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-7)
    state = json.loads((tmp_path / "full" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert state["step"] == 6 and state["world_size"] == 1
