"""DePTModel: the DePT module in front of real (tiny, saved) T5 and LLaMA backbones, without DeepSpeed: exact
equivalences (B = 0 is PT; r = 0 is PEFT's prompt tuning), dynamic vs fixed padding, left-padded generation, the
TEXT init."""

from __future__ import annotations

import pytest
import torch

from pipeline.backbone import load_backbone
from pipeline.data import collate, tokenize
from pipeline.dept import DeptConfig, DePTPrompt, init_prompt_, prompt_init_ids
from pipeline.model import DePTModel, init_dept_prompt


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


def test_text_init_tiles_the_init_text(backbone):
    cfg = DeptConfig(num_virtual_tokens=7, r=0, max_length=32, d_model=backbone.d_model, init_text="cat dog")
    ids = prompt_init_ids(cfg, backbone.tokenizer, 1000, seed=0)
    text_ids = backbone.tokenizer("cat dog")["input_ids"]  # with its specials, as PEFT and the authors
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
    config = PromptTuningConfig(
        task_type=task, num_virtual_tokens=6, num_transformer_submodules=1, token_dim=backbone.d_model
    )
    peft_model = get_peft_model(fresh, config)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(ours.prompt)
    expected = peft_model(**batch).logits
    got = DePTModel(backbone.model, ours, backbone.is_encoder_decoder)(**batch).logits
    if not backbone.is_encoder_decoder:
        expected = expected[:, -got.shape[1] :] if expected.shape[1] != got.shape[1] else expected
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


def test_init_dept_prompt_is_the_same_for_the_same_seed(backbone):
    cfg = DeptConfig(num_virtual_tokens=6, r=2, max_length=32, d_model=backbone.d_model)
    a, b = init_dept_prompt(cfg, backbone, seed=3), init_dept_prompt(cfg, backbone, seed=3)
    for name, tensor in a.named_parameters():
        assert torch.equal(tensor, dict(b.named_parameters())[name]), name
    assert not torch.equal(a.lora_A, init_dept_prompt(cfg, backbone, seed=4).lora_A)


@pytest.mark.parametrize("method", ["dept", "pt", "finetune"])
def test_micro_batch_losses_over_the_global_count_add_up_to_the_whole_batch_mean(backbone, method):
    """#20: the loss of a micro-batch is its token-loss sum over a given denominator, so micro-batches scaled by the
    whole batch's target count add up to the whole batch's token mean, and so do their gradients (targets of
    different lengths: a mean of per-micro-batch means would not)."""
    prompt = {"dept": lambda: dept(backbone), "pt": lambda: dept(backbone, r=0), "finetune": lambda: None}[method]()
    net = DePTModel(backbone.model, prompt, backbone.is_encoder_decoder)
    rows = [{"source": r["source"], "target": " ".join(["house"] * (i * 3 + 1))} for i, r in enumerate(ROWS)]
    tokenized = tokenize(rows, backbone.tokenizer, backbone.is_encoder_decoder, max_length=32)
    pad_id = backbone.tokenizer.pad_token_id
    whole = collate(tokenized, pad_id, backbone.is_encoder_decoder)
    parts = [
        collate(tokenized[:1], pad_id, backbone.is_encoder_decoder),
        collate(tokenized[1:], pad_id, backbone.is_encoder_decoder),
    ]
    counts = [net.count_targets(p["labels"]) for p in parts]
    assert sum(counts) == net.count_targets(whole["labels"]) and counts[0] != counts[1] / 2
    # finetune: the embedding stands for the backbone's weights (the fixture's backbone is frozen)
    trainable = [backbone.model.get_input_embeddings().weight] if prompt is None else list(prompt.parameters())

    def grads(loss):
        return [g.clone() for g in torch.autograd.grad(loss, trainable)]

    for param in trainable:
        param.requires_grad_(True)

    full = net(**whole).loss  # the default denominator: the batch's own target count (its token mean)
    split = [net(**p, loss_denominator=sum(counts)).loss for p in parts]
    assert sum(s.item() for s in split) == pytest.approx(full.item(), rel=1e-5)
    mean_of_means = sum(net(**p).loss.item() for p in parts) / 2
    assert mean_of_means != pytest.approx(full.item(), rel=1e-3)  # what the loss was before 0.3
    for a, b in zip(grads(full), grads(sum(split))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    if prompt is None:
        trainable[0].requires_grad_(False)
