"""The DePT module on its own: shapes, init, scale, the parameter budget, one-line shape errors."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.dept import DeptConfig, DePTPrompt, count_trainable, rank_for_budget
from pipeline.errors import PipelineError


def test_shapes_init_and_scale():
    cfg = DeptConfig(num_virtual_tokens=60, r=30, max_length=256, d_model=768)
    module = DePTPrompt(cfg)
    assert module.prompt.shape == (60, 768)
    assert module.lora_A.shape == (256, 30) and module.lora_B.shape == (30, 768)
    assert torch.count_nonzero(module.lora_B) == 0
    bound = 1 / math.sqrt(30)  # kaiming_uniform_(a=sqrt(5)) on [s, r]
    assert module.lora_A.abs().max() <= bound and module.lora_A.abs().max() > 0.9 * bound
    assert cfg.scale == pytest.approx(8 / math.sqrt(30))
    assert sum(p.numel() for p in module.parameters()) == cfg.num_trainable == 76_800
    pt = DePTPrompt(DeptConfig(num_virtual_tokens=100, r=0, max_length=256, d_model=768))
    assert pt.lora_A is None and sum(p.numel() for p in pt.parameters()) == 76_800


@pytest.mark.parametrize("m,r", [(60, 30), (40, 45), (80, 15), (0, 75), (100, 0)])
def test_rank_for_budget_matches_paper(m, r):
    assert rank_for_budget(100, m, 256, 768) == r
    assert count_trainable(m, r, 256, 768) == 76_800


def test_budget_and_shape_errors_are_one_line():
    with pytest.raises(PipelineError, match="budget cannot be met"):
        rank_for_budget(40, 60, 256, 768)
    for bad in (
        dict(num_virtual_tokens=-1),
        dict(r=-2),
        dict(max_length=0),
        dict(r=300, max_length=256),
        dict(num_virtual_tokens=0, r=0),
        dict(prompt_init="SOMETHING"),
    ):
        with pytest.raises(PipelineError) as err:
            DeptConfig(**{"d_model": 64, **bad})
        assert "\n" not in str(err.value)


def test_m0_has_no_prompt_parameter_and_round_trips(tmp_path):
    from pipeline import adapters

    module = DePTPrompt(DeptConfig(num_virtual_tokens=0, r=4, max_length=16, d_model=8))
    assert module.prompt is None and [n for n, _ in module.named_parameters()] == ["lora_A", "lora_B"]
    embeds, mask, _ = module(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long))
    assert embeds.shape == (2, 5, 8)
    adapters.save_adapter(module, tmp_path / "a", "x")
    assert set(adapters.read_adapter(tmp_path / "a")[1]) == {"lora_A", "lora_B"}


# Moved here until tests/test_data.py absorbs them.
def test_length_grouped_batches_keep_every_row_and_group_lengths():
    from pipeline.data import epoch_order

    lengths = [(i * 37) % 101 for i in range(400)]
    plain = epoch_order(400, seed=3, epoch=0)
    grouped = epoch_order(400, seed=3, epoch=0, lengths=lengths, batch_size=8)
    assert sorted(grouped) == list(range(400)) and grouped == epoch_order(400, 3, 0, lengths, 8)

    def spread(order):  # mean within-batch length range: what dynamic padding wastes
        batches = [order[i : i + 8] for i in range(0, 400, 8)]
        return sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches) / len(batches)

    assert spread(grouped) < spread(plain) / 4


def test_param_groups_are_the_two_learning_rates_of_the_tensors_that_exist():
    """Training and the bench take their optimizer groups from here: prompt and low-rank pair, each with its rate;
    no group for a tensor that m = 0 or r = 0 leaves out."""
    full = DePTPrompt(DeptConfig(num_virtual_tokens=4, r=2, max_length=8, d_model=16))
    groups = full.param_groups(0.3, 1e-4, prefix="a.")
    assert [(g["name"], g["lr"], len(g["params"])) for g in groups] == [("a.prompt", 0.3, 1), ("a.lowrank", 1e-4, 2)]
    assert groups[0]["params"][0] is full.prompt and groups[1]["params"] == [full.lora_A, full.lora_B]
    no_prompt = DePTPrompt(DeptConfig(num_virtual_tokens=0, r=2, max_length=8, d_model=16))
    assert [g["name"] for g in no_prompt.param_groups(0.3, 1e-4)] == ["lowrank"]
    prompt_only = DePTPrompt(DeptConfig(num_virtual_tokens=4, r=0, max_length=8, d_model=16))
    assert [g["name"] for g in prompt_only.param_groups(0.3, 1e-4)] == ["prompt"]
