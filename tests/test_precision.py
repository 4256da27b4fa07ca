"""Where precision changes results (#20): bf16 moves the losses of a job slightly off fp32's (the README states the
measured difference); T5 in fp16 is refused in one line unless allowed."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import read_results, run

from pipeline.backbone import load_backbone
from pipeline.errors import PipelineError


def fp16_config(tmp_path):
    path = tmp_path / "zero3_fp16.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}))
    return path


def test_t5_in_fp16_is_refused_unless_allowed(tmp_path, toy_task):
    with pytest.raises(PipelineError, match="T5 overflows in fp16"):
        load_backbone("random:tiny-t5", dtype=torch.float16)
    assert load_backbone("random:tiny-t5", dtype=torch.float16, allow_fp16_t5=True).model.dtype == torch.float16
    assert load_backbone("stories260K", dtype=torch.float16).model.dtype == torch.float16  # LLaMA: not refused
    args = ["train", "--model", "random:tiny-t5", "--train_file", str(toy_task), "--output_dir", str(tmp_path / "o")]
    proc = run([*args, "--ds_config", str(fp16_config(tmp_path)), "--steps", "1", "--warmup_steps", "0"], check=False)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "T5 overflows in fp16" in errors[0] and "zero3_gpu_bf16" in errors[0], proc.stderr
    assert not (tmp_path / "o" / "results.json").exists()


@pytest.mark.slow
def test_bf16_moves_the_losses_of_a_job_slightly(tmp_path):
    """The same job (stories260K, a real LM) under the fp32 and the bf16 CPU configs: close, not equal."""
    losses = {}
    for config in ("zero3_cpu", "zero3_cpu_bf16"):
        out = tmp_path / config
        run(
            [
                *("train", "--model", "stories260K", "--task", "stories-animal", "--output_dir", str(out)),
                *("--num_virtual_tokens", "8", "--lora_rank", "2", "--max_length", "96", "--batch_size", "16"),
                *("--steps", "4", "--warmup_steps", "1", "--log_every", "1", "--lr_lowrank", "0.003"),
                *("--evaluate", "false", "--ds_config", config),
            ]
        )
        losses[config] = [h["loss"] for h in read_results(out)["history"]]
    fp32, bf16 = losses["zero3_cpu"], losses["zero3_cpu_bf16"]
    assert fp32 != bf16
    assert bf16 == pytest.approx(fp32, rel=0.03)  # measured: 0.3% at step 1, at most 4.1% over 30 steps
