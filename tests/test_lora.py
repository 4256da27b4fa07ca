"""Method lora (pipeline/lora.py): PEFT's LoRA on the frozen ZeRO-3 backbone, in the same jobs and recipes as DePT.

Fast: the config's refusals, the budget rank, fingerprints, recipe inheritance; one rank in process (a real ZeRO-3
engine): the adapter loaded by `PeftModel.from_pretrained` with the logits of `load_dept`. Slow: one rank in process,
exact resume from a checkpoint; two ranks under the deepspeed launcher, killed after a checkpoint and resumed, equal
to an uninterrupted run, then `dept predict` on the adapter.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import read_results, run

from pipeline import lora
from pipeline.config import JobConfig, LoraArgs
from pipeline.data import read_source_target
from pipeline.errors import PipelineError
from pipeline.fingerprint import job_fingerprint
from pipeline.options import build


def lora_job(tmp_path, data, name="out", model="random:tiny-t5", lora_args=None, **train_args) -> JobConfig:
    steps = train_args.pop("steps", 8)
    return build(
        JobConfig,
        {
            "model": str(model),
            "output_dir": str(tmp_path / name),
            "method": "lora",
            "data": {"train_file": str(data)},
            "dept": {"max_length": 16},
            "lora": {"r": 2, "dropout": 0.1, **(lora_args or {})},
            "train": {
                "batch_size": 4,
                "steps": steps,
                "warmup_steps": 2,
                "log_every": 1,
                "lr_lora": 0.01,
                **train_args,
            },
        },
        "job",
    )


# ----------------------------------------------------------------------------------------------- config


def test_dept_flags_that_read_like_loras_are_refused_on_a_lora_job(tmp_path):
    base = {"model": "m", "output_dir": str(tmp_path), "method": "lora", "data": {"tasks": ["rte"]}}
    for dept, hint in (({"r": 4}, "--lora_r"), ({"lora_alpha": 16}, "--alpha"), ({"num_virtual_tokens": 8}, "prompt")):
        with pytest.raises(PipelineError, match=hint):
            build(JobConfig, {**base, "dept": dept}, "job")
    with pytest.raises(PipelineError, match="give one of lora_r"):
        build(JobConfig, {**base, "lora": {"r": 2, "budget_tokens": 16}}, "job")
    with pytest.raises(PipelineError, match="below 1"):
        LoraArgs(dropout=1.0)


def test_the_budget_rank_spends_about_the_prompt_tuning_budget():
    assert lora.rank_for_budget(1024, 1120) == 1
    assert lora.rank_for_budget(76_800, 4 * 768 * 24) == 1  # T5-base q, v: 1,536 per layer per rank, 24 layers
    assert lora.rank_for_budget(10, 1120) == 1  # never 0
    assert lora.rank_for_budget(5 * 1120 + 100, 1120) == 5


def test_lora_fields_leave_other_methods_fingerprints_alone_and_count_for_lora(tmp_path):
    def digest(method, **lora_args):
        raw = {"model": "m", "output_dir": str(tmp_path), "method": method, "data": {"tasks": ["rte"]}}
        return job_fingerprint(build(JobConfig, {**raw, "lora": lora_args}, "job"))[0]

    assert digest("dept") == digest("dept", r=4, dropout=0.1)
    assert digest("lora") != digest("lora", r=4)
    assert digest("lora", r=4) != digest("lora", r=4, target_modules=["q", "k", "v"])


def test_a_lora_stage_inherits_only_the_input_length_of_the_recipes_dept_section(tmp_path):
    from pipeline.recipe import load_recipe, plan

    path = tmp_path / "r.yaml"
    path.write_text(
        "name: r\nmodel: m\noutput_dir: out\n"
        "dept: {num_virtual_tokens: 12, r: 1, max_length: 96, lora_alpha: 4}\n"
        "lora: {dropout: 0.05}\n"
        "stages:\n"
        "  - {name: dept, tasks: [rte]}\n"
        "  - {name: lora, method: lora, tasks: [rte], lora: {budget_tokens: 16}, train: {lr_lora: 0.01}}\n"
    )
    jobs = {j.stage: j.config for j in plan(load_recipe(str(path)))}
    assert jobs["lora"].dept.max_length == 96 and jobs["lora"].dept.num_virtual_tokens is None
    assert jobs["lora"].lora.dropout == 0.05 and jobs["lora"].lora.budget_tokens == 16
    assert jobs["dept"].dept.r == 1


# ----------------------------------------------------------------------------------------------- one rank


@pytest.mark.slow
def test_one_rank_trains_lora_only_and_resumes_to_the_uninterrupted_result(tmp_path, toy_task, one_process_group):
    from pipeline.train import train

    rows = read_source_target(toy_task)
    full = train(lora_job(tmp_path, toy_task, "full", save_every=3, keep_checkpoints=5), rows)
    assert full.trainable_names and all(".lora_" in n for n in full.trainable_names)
    # tiny T5: q and v of 2 encoder + 2 decoder layers (+ cross-attention), 64 -> 64 each, r = 2
    assert full.trainable_params == full.lora_shape["trainable"] == 2 * full.lora_shape["per_rank"]
    assert full.lora_shape["target_modules"] == ["q", "v"] and full.dept_shape is None
    assert {h["lr_lora"] for h in full.history} and full.history[-1]["loss"] < full.history[0]["loss"]

    resumed_dir = tmp_path / "resumed"
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-00000003", resumed_dir / "checkpoints" / "step-00000003")
    (resumed_dir / "checkpoints" / "latest").write_text("step-00000003\n")
    lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    (resumed_dir / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    resumed = train(lora_job(tmp_path, toy_task, "resumed", save_every=3, keep_checkpoints=5), rows)
    assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history], rel=1e-6)
    a, b = lora.read_adapter(tmp_path / "full" / "adapter"), lora.read_adapter(resumed_dir / "adapter")
    assert set(a.tensors) == set(b.tensors) and any(t.abs().sum() > 0 for k, t in a.tensors.items() if "lora_B" in k)
    for name in a.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["t5", "llama"])
def test_the_adapter_loads_in_peft_with_the_logits_of_load_dept(
    arch, tmp_path, toy_task, tiny_models, one_process_group
):
    """What a user of PEFT does, with no code of ours: `PeftModel.from_pretrained(base, adapter)`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from pipeline.inference import load_dept
    from pipeline.train import train

    model = tiny_models[arch]
    result = train(lora_job(tmp_path, toy_task, model=model, steps=6, lr_lora=0.05), read_source_target(toy_task))
    adapter = tmp_path / "out" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"

    ours = load_dept(str(model), str(adapter))
    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    theirs = PeftModel.from_pretrained(auto.from_pretrained(model), str(adapter)).eval()
    bare = auto.from_pretrained(model).eval()
    batch = ours.tokenizer(["sentence: cat dog", "sentence: a tree by the house"], return_tensors="pt", padding=True)
    extra = {"decoder_input_ids": torch.zeros(2, 3, dtype=torch.long)} if arch == "t5" else {}
    with torch.no_grad():
        peft_logits = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
        bare_logits = bare(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra).logits
    our_logits = ours(batch["input_ids"], batch["attention_mask"], **extra)
    torch.testing.assert_close(our_logits, peft_logits, rtol=1e-5, atol=1e-6)
    assert (peft_logits - bare_logits).abs().max() > 1e-4  # the adapter changes the model: a trained one was loaded
    assert result.lora_shape["target_modules"] == lora.default_targets(bare)


def test_a_lora_adapter_is_refused_where_a_dept_adapter_is_needed(tmp_path, toy_task, one_process_group):
    from pipeline.interop import read_any_adapter
    from pipeline.train import train

    train(lora_job(tmp_path, toy_task, steps=2, warmup_steps=0), read_source_target(toy_task))
    with pytest.raises(PipelineError, match="LoRA adapter"):
        read_any_adapter(tmp_path / "out" / "adapter")
    (tmp_path / "out" / "adapter" / "adapter_model.safetensors").write_bytes(b"0" * 10)
    with pytest.raises(PipelineError, match="checksum"):
        lora.read_adapter(tmp_path / "out" / "adapter")


# ----------------------------------------------------------------------------------------------- two ranks


def cli_args(model, data, out, *extra, steps=10):
    """`dept train --method lora` on a tiny backbone with dropout in the model and in the LoRA pairs."""
    flags = {
        "method": "lora", "model": model, "train_file": data, "output_dir": out, "lora_r": 2, "lora_dropout": 0.1,
        "max_length": 16, "batch_size": 8, "steps": steps, "warmup_steps": 2, "log_every": 1, "lr_lora": 0.01,
        "model_overrides": '{"dropout_rate": 0.1}',
    }  # fmt: skip
    return ["train", *[word for flag, value in flags.items() for word in (f"--{flag}", str(value))], *extra]


@pytest.mark.slow
def test_lora_under_zero3_on_two_ranks_is_killed_resumes_exactly_and_serves(tiny_models, toy_task, tmp_path):
    model = tiny_models["t5"]
    out, straight = tmp_path / "killed", tmp_path / "straight"
    cmd = cli_args(model, toy_task, out, "--save_every", "2")
    killed = run(cmd, nproc=2, launcher="deepspeed", env={"DEPT_FAULT_KILL_AT_STEP": "4"}, check=False)
    assert killed.returncode != 0 and (out / "checkpoints" / "latest").read_text().strip() == "step-00000004"
    run(cmd, nproc=2, launcher="deepspeed")
    run(cli_args(model, toy_task, straight), nproc=2, launcher="deepspeed")

    resumed, uninterrupted = read_results(out), read_results(straight)
    assert [h["loss"] for h in resumed["history"]] == pytest.approx(
        [h["loss"] for h in uninterrupted["history"]], rel=1e-6, abs=1e-7
    )
    assert [s["held_fraction"] for s in uninterrupted["sharding"]] == pytest.approx([0.5, 0.5], abs=0.01)
    assert resumed["world_size"] == 2 and resumed["lora_shape"]["r"] == 2
    a, b = lora.read_adapter(out / "adapter"), lora.read_adapter(straight / "adapter")
    for name in b.tensors:
        torch.testing.assert_close(a.tensors[name], b.tensors[name], rtol=1e-5, atol=1e-7)

    # the adapter serves: `dept predict` in one process, under the LoRA's own input length
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"source": "sentence: cat dog", "target": "1"}) for _ in range(3)) + "\n")
    preds = tmp_path / "preds.jsonl"
    done = run(["predict", "--model", str(model), "--adapter", str(out / "adapter"), "--data", str(rows),
                "--output", str(preds), "--max_new_tokens", "3"])  # fmt: skip
    assert "predictions in" in done.stdout and len(preds.read_text().splitlines()) == 3


def test_a_paper_recipe_runs_as_its_lora_row_by_override():
    """The documented LoRA row of a paper recipe: every stage as LoRA at the paper's budget, each task's s kept."""
    from pipeline.recipe import load_recipe, plan

    overrides = {"method": "lora", "lora.budget_tokens": "100", "train.lr_lora": "5e-4", "output_dir": "runs/x"}
    for name, s in (("glue_t5_base", {256}), ("mrqa_t5_base", {512})):
        jobs = plan(load_recipe(name, overrides))
        assert {j.config.method for j in jobs} == {"lora"} and {j.config.max_length for j in jobs} == s
        assert all(j.config.lora.budget_tokens == 100 and j.config.dept.num_virtual_tokens is None for j in jobs)
