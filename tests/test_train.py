"""The training loop in-process (one rank: the whole model and a plain step, or a real ZeRO-3 engine with
`--sharding zero3`): the DePT shape it resolves, two learning rates on their schedule, the global batch order, what it
returns; kill-free resume from a checkpoint; the same steps and checkpoints at stage 0 and under ZeRO-3."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from support import raises_one_line

from pipeline.config import JobConfig
from pipeline.data import global_batch, read_source_target
from pipeline.dept import DeptConfig
from pipeline.engine import ONE_THREAD_BELOW_PARAMS, cpu_threads, plan_stage, warmup_then_linear_decay, zero_stage
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


# ----------------------------------------------------------------------------------------------- ZeRO stage (#24)


def test_the_stage_is_3_over_several_ranks_or_when_asked_and_0_for_a_whole_model_in_one_process():
    ds = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}, "bf16": {"enabled": True}}
    unsharded, why = plan_stage(ds, world=1)
    assert zero_stage(unsharded) == 0 and "one process holds the whole model" in why
    assert unsharded["zero_optimization"]["stage3_param_persistence_threshold"] == 0 and zero_stage(ds) == 3
    assert plan_stage(ds, world=2) == (ds, "ZeRO stage 3: the frozen backbone is sharded over 2 ranks")
    assert zero_stage(plan_stage(ds, 1, "zero3")[0]) == 3
    offload = {"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}}
    assert plan_stage(offload, 1)[1].endswith("offloads (offload_param)")
    assert zero_stage(plan_stage({**ds, "fp16": {"enabled": True}}, 1)[0]) == 3
    not_offloading = {"zero_optimization": {"stage": 3, "offload_param": {"device": "none"}}}
    assert zero_stage(plan_stage(not_offloading, 1)[0]) == 0
    raises_one_line("sharding must be one of auto, zero3, replicate", plan_stage, ds, 1, "zero2")


def test_replicate_runs_stage_0_on_several_ranks_and_refuses_what_only_zero3_can_run():
    ds = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": True}}
    replicated, why = plan_stage(ds, world=4, sharding="replicate")
    assert zero_stage(replicated) == 0 and why.startswith("ZeRO stage 0 on 4 ranks (--sharding replicate)")
    assert zero_stage(plan_stage(ds, 1, "replicate")[0]) == 0  # one process: what auto does
    offload = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    raises_one_line(
        "--sharding replicate cannot run this DeepSpeed config: the DeepSpeed config offloads "
        "(offload_optimizer); use --sharding auto",
        plan_stage,
        offload,
        2,
        "replicate",
    )
    raises_one_line(
        "fp16 needs DeepSpeed's loss scaling", plan_stage, {**ds, "fp16": {"enabled": True}}, 2, "replicate"
    )


def _resume_from(tmp_path, source: str, name: str, step: int) -> None:
    """`name`'s output folder holding `source`'s checkpoint at `step` and the metrics logged up to it."""
    target = tmp_path / name
    tag = f"step-{step:08d}"
    (target / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / source / "checkpoints" / tag, target / "checkpoints" / tag)
    (target / "checkpoints" / "latest").write_text(tag + "\n")
    lines = (tmp_path / source / "metrics.jsonl").read_text().splitlines()
    (target / "metrics.jsonl").write_text("\n".join(lines[:step]) + "\n")


def test_one_process_trains_at_stage_0_with_the_steps_and_checkpoints_of_zero3(tmp_path, toy_task, caplog):
    """The whole model with a plain step (stage 0, the default in one process) gives ZeRO-3's losses and adapter, says
    so once in the log, and a checkpoint of either continues under the other to the same result."""
    from pipeline.adapters import read_adapter

    rows = read_source_target(toy_task)
    opts = {"save_every": 4, "keep_checkpoints": 5, "steps": 8}
    with caplog.at_level("INFO", logger="pipeline.train"):
        plain = train(job(tmp_path, toy_task, "plain", **opts), rows)
    said = [r.getMessage() for r in caplog.records if "ZeRO stage" in r.getMessage()]
    assert said == ["ZeRO stage 0: one process holds the whole model (a plain PyTorch step, no ZeRO-3 hooks)"]
    sharded = train(job(tmp_path, toy_task, "zero3", sharding="zero3", **opts), rows)
    assert plain.sharding[0]["held_fraction"] == sharded.sharding[0]["held_fraction"] == 1.0
    expected = [h["loss"] for h in sharded.history]
    assert [h["loss"] for h in plain.history] == pytest.approx(expected, rel=1e-5)
    assert plain.probe == pytest.approx(sharded.probe, rel=1e-5)

    _resume_from(tmp_path, "zero3", "zero3-then-plain", 4)
    _resume_from(tmp_path, "plain", "plain-then-zero3", 4)
    moved = {
        "zero3-then-plain": train(job(tmp_path, toy_task, "zero3-then-plain", **opts), rows),
        "plain-then-zero3": train(job(tmp_path, toy_task, "plain-then-zero3", sharding="zero3", **opts), rows),
    }
    reference = read_adapter(tmp_path / "zero3" / "adapter")[1]
    for name, result in moved.items():
        assert [h["loss"] for h in result.history] == pytest.approx(expected, rel=1e-5), name
    for name in ("plain", *moved):
        tensors = read_adapter(tmp_path / name / "adapter")[1]
        for key in reference:
            torch.testing.assert_close(tensors[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


@pytest.mark.slow  # ~35 s idle: two bf16 runs, one of them through ZeRO-3
def test_bf16_in_one_process_trains_fp32_masters_like_zero3(tmp_path, toy_task):
    """bf16 at stage 0: the model in bf16, AdamW on fp32 master copies (DeepSpeed's mixed precision): the losses follow
    ZeRO-3's bf16 run, and the checkpoint holds fp32 masters that moved by less than bf16's resolution."""
    from safetensors.torch import load_file

    rows = read_source_target(toy_task)
    opts = {"steps": 6, "save_every": 5, "lr_prompt": 1e-4, "lr_lowrank": 1e-4}
    plain, sharded = (
        job(tmp_path, toy_task, "plain", **opts),
        job(tmp_path, toy_task, "zero3", sharding="zero3", **opts),
    )
    plain.ds_config = sharded.ds_config = "zero3_cpu_bf16"
    plain, sharded = train(plain, rows), train(sharded, rows)
    assert [h["loss"] for h in plain.history] == pytest.approx([h["loss"] for h in sharded.history], rel=2e-3)
    checkpoint = "checkpoints/step-00000005/trainable.safetensors"
    a, b = load_file(tmp_path / "plain" / checkpoint), load_file(tmp_path / "zero3" / checkpoint)
    assert a.keys() == b.keys() and all(t.dtype == torch.float32 for t in a.values())
    for key in (k for k in a if k.startswith("param/")):  # (the moments of B, which starts at 0, are mostly noise)
        torch.testing.assert_close(a[key], b[key], rtol=1e-2, atol=1e-5, msg=key)
    assert not torch.equal(a["param/prompt.prompt"], a["param/prompt.prompt"].bfloat16().float())


def test_zero3_training_continues_exactly_after_an_evaluation_that_gathered_the_model_once(tmp_path, toy_task, caplog):
    """Validation under ZeRO-3 gathers the model once, unhooks it, generates, and hooks it again (#24): the steps after
    it are those of the whole model's run (stage 0), and so are the predictions' metrics."""
    from pipeline.evaluation import Evaluator
    from pipeline.tasks import get_task

    rows = read_source_target(toy_task)

    def make_evaluator(backbone, max_length):
        task = get_task("syn-target-food")
        return Evaluator(task, rows[:6], rows[6:10], backbone.tokenizer, True, max_length, max_new_tokens=3)

    opts = {"steps": 6, "eval_every": 2}
    with caplog.at_level("INFO", logger="pipeline.engine"):
        sharded = train(job(tmp_path, toy_task, "zero3", sharding="zero3", **opts), rows, make_evaluator)
    assert any("the model gathered once" in r.getMessage() for r in caplog.records)
    plain = train(job(tmp_path, toy_task, "plain", **opts), rows, make_evaluator)
    assert [h["loss"] for h in sharded.history] == pytest.approx([h["loss"] for h in plain.history], rel=1e-5)
    assert [e["score"] for e in sharded.evals] == [e["score"] for e in plain.evals] and len(plain.evals) == 3
    assert sharded.test == plain.test
