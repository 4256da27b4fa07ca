"""The DePT module on its own (no DeepSpeed): shapes, init, budget, exact equivalences, padding, cross-check
against PEFT's prompt tuning."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.backbone import DePTModel, load_backbone
from pipeline.data import collate, tokenize
from pipeline.dept import DePTPrompt, DeptConfig, count_trainable, init_prompt_, prompt_init_ids, rank_for_budget
from pipeline.errors import PipelineError


@pytest.fixture(scope="module", params=["t5", "llama"])
def backbone(request, tiny_models):
    torch.manual_seed(0)
    b = load_backbone(str(tiny_models[request.param]))
    b.model.eval()
    return b


ROWS = [
    {"source": "premise: the cat sat on the mat hypothesis: a cat sat", "target": "0"},
    {"source": "sentence: dog", "target": "1"},
    {"source": "question: what is big and red and very old answer: the house", "target": "2"},
]


def batch_for(b, pad_to=None, generation=False):
    rows = tokenize(ROWS, b.tokenizer, b.is_encoder_decoder, max_length=32)
    return collate(rows, b.tokenizer.pad_token_id, b.is_encoder_decoder, pad_to=pad_to, for_generation=generation)


def dept(b, m=5, r=3, s=32, random_b=True, seed=1):
    torch.manual_seed(seed)
    module = DePTPrompt(DeptConfig(num_virtual_tokens=m, r=r, max_length=s, d_model=b.d_model, prompt_init="RANDOM"))
    init_prompt_(module, None, seed)
    if random_b and r:
        with torch.no_grad():
            module.lora_B.normal_(0, 0.5)
    return module


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
    for bad in (dict(num_virtual_tokens=-1), dict(r=-2), dict(max_length=0), dict(r=300, max_length=256),
                dict(num_virtual_tokens=0, r=0), dict(prompt_init="SOMETHING")):
        with pytest.raises(PipelineError) as err:
            DeptConfig(**{"d_model": 64, **bad})
        assert "\n" not in str(err.value)


def test_text_init_tiles_the_init_text(backbone):
    cfg = DeptConfig(num_virtual_tokens=7, r=0, max_length=32, d_model=backbone.d_model, init_text="cat dog")
    ids = prompt_init_ids(cfg, backbone.tokenizer, 1000, seed=0)
    text_ids = backbone.tokenizer("cat dog", add_special_tokens=False)["input_ids"]
    assert ids == (text_ids * 7)[:7]
    module = DePTPrompt(cfg)
    rows = backbone.model.get_input_embeddings().weight.detach()[ids]
    init_prompt_(module, rows, seed=0)
    assert torch.equal(module.prompt.detach(), rows)


def test_b_zero_equals_prompt_tuning_with_m_tokens(backbone):
    batch = batch_for(backbone)
    with_offset = dept(backbone, m=5, r=3, random_b=False)
    pt = DePTPrompt(DeptConfig(num_virtual_tokens=5, r=0, max_length=32, d_model=backbone.d_model))
    with torch.no_grad():
        pt.prompt.copy_(with_offset.prompt)
    a = DePTModel(backbone.model, with_offset, backbone.is_encoder_decoder)(**batch).logits
    b = DePTModel(backbone.model, pt, backbone.is_encoder_decoder)(**batch).logits
    assert torch.equal(a, b)


def test_r0_matches_peft_prompt_tuning(backbone, tiny_models):
    from peft import PromptTuningConfig, get_peft_model

    batch = batch_for(backbone)
    fresh = load_backbone(backbone.name).model.eval()  # PEFT wraps (and freezes) the model it is given
    ours = dept(backbone, m=6, r=0)
    task = "SEQ_2_SEQ_LM" if backbone.is_encoder_decoder else "CAUSAL_LM"
    config = PromptTuningConfig(task_type=task, num_virtual_tokens=6, num_transformer_submodules=1,
                                token_dim=backbone.d_model)
    peft_model = get_peft_model(fresh, config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(ours.prompt)
    expected = peft_model(**batch).logits
    got = DePTModel(backbone.model, ours, backbone.is_encoder_decoder)(**batch).logits
    if not backbone.is_encoder_decoder:
        expected = expected[:, -got.shape[1]:] if expected.shape[1] != got.shape[1] else expected
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_dynamic_padding_equals_padding_to_s(backbone):
    model = DePTModel(backbone.model, dept(backbone, s=32), backbone.is_encoder_decoder)
    dynamic = model(**batch_for(backbone)).loss
    padded = model(**batch_for(backbone, pad_to=32)).loss
    torch.testing.assert_close(dynamic, padded, rtol=1e-5, atol=1e-6)


def test_offset_follows_position_within_sequence_under_left_padding(backbone):
    """The generation batch (left padding for LLaMA) yields the same next-token logits as each row alone."""
    model = DePTModel(backbone.model, dept(backbone), backbone.is_encoder_decoder)
    batch = batch_for(backbone, generation=True)
    together = model.generate(**batch, max_new_tokens=3)
    for i in range(len(ROWS)):
        single = batch_for(backbone, generation=True)
        length = int(single["attention_mask"][i].sum())
        ids = single["input_ids"][i][single["attention_mask"][i].bool()][:length].unsqueeze(0)
        alone = model.generate(ids, torch.ones_like(ids), max_new_tokens=3)
        assert torch.equal(alone[0], together[i][: alone.shape[1]]), f"row {i}"


def test_input_longer_than_s_warns_and_does_not_crash(backbone, caplog):
    module = dept(backbone, s=4)
    model = DePTModel(backbone.model, module, backbone.is_encoder_decoder)
    out = model(**batch_for(backbone))
    assert torch.isfinite(out.loss)
    assert "longer than max_length" in caplog.text


def test_tokenize_truncates_to_s_with_a_warning(backbone, caplog):
    rows = tokenize(ROWS, backbone.tokenizer, backbone.is_encoder_decoder, max_length=6, max_target_length=4)
    assert max(len(r["input_ids"]) for r in rows) <= 6
    assert "truncated" in caplog.text


def test_length_grouped_batches_keep_every_row_and_group_lengths():
    from pipeline.data import epoch_order

    lengths = [(i * 37) % 101 for i in range(400)]
    plain = epoch_order(400, seed=3, epoch=0)
    grouped = epoch_order(400, seed=3, epoch=0, lengths=lengths, batch_size=8)
    assert sorted(grouped) == list(range(400)) and grouped == epoch_order(400, 3, 0, lengths, 8)

    def spread(order):  # mean within-batch length range: what dynamic padding wastes
        batches = [order[i:i + 8] for i in range(0, 400, 8)]
        return sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches) / len(batches)

    assert spread(grouped) < spread(plain) / 4


def test_m0_has_no_prompt_parameter_and_round_trips(tmp_path):
    from pipeline import adapters

    module = DePTPrompt(DeptConfig(num_virtual_tokens=0, r=4, max_length=16, d_model=8))
    assert module.prompt is None and [n for n, _ in module.named_parameters()] == ["lora_A", "lora_B"]
    embeds, mask, _ = module(torch.randn(2, 5, 8), torch.ones(2, 5, dtype=torch.long))
    assert embeds.shape == (2, 5, 8)
    adapters.save_adapter(module, tmp_path / "a", "x")
    assert set(adapters.read_adapter(tmp_path / "a")[1]) == {"lora_A", "lora_B"}


def test_half_precision_linears_get_column_major_output_grads_on_cpu():
    """The workaround for pytorch/pytorch#146508 (CPU bf16 GEMM with two row-major operands is a scalar loop):
    every Linear of a 16-bit backbone sees a column-major grad_output, and the input gradient is unchanged."""
    from torch import nn

    from pipeline.backbone import column_major_output_grads

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(48, 80), nn.GELU(), nn.Linear(80, 24)).to(torch.bfloat16)
    hooked = nn.Sequential(nn.Linear(48, 80), nn.GELU(), nn.Linear(80, 24)).to(torch.bfloat16)
    hooked.load_state_dict(plain.state_dict())
    column_major_output_grads(hooked)
    seen = []

    def probe(module, args, output):  # registered after the workaround's hook: sees what the Linear's backward gets
        output.register_hook(lambda grad: seen.append(grad.stride()))

    for module in hooked:
        if isinstance(module, nn.Linear):
            module.register_forward_hook(probe)
    x = torch.randn(3, 7, 48, dtype=torch.bfloat16)
    grads = []
    for net in (plain, hooked):
        inputs = x.clone().requires_grad_()
        net(inputs).float().pow(2).sum().backward()
        grads.append(inputs.grad.float())
    assert len(seen) == 2 and all(stride[-2] == 1 for stride in seen), seen  # tokens contiguous: column-major
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-2, atol=2e-2)
    assert grads[0].abs().sum() > 0


def test_fp32_backbone_gets_no_layout_hooks():
    backbone = load_backbone("random:tiny-llama", None, torch.float32)
    assert not any(m._forward_hooks for m in backbone.model.modules())
    half = load_backbone("random:tiny-llama", None, torch.bfloat16)
    linears = [m for m in half.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(m._forward_hooks for m in linears)
