"""Backbones: loading presets with fixed seeds, and the CPU bf16 layout workaround."""

from __future__ import annotations

import torch

from pipeline.backbone import load_backbone


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


def test_a_random_preset_is_the_same_backbone_for_the_same_seed():
    """Training and inference both pass the job's seed: an adapter is scored on the backbone it was trained on."""
    torch.manual_seed(123)  # whatever the global state, the weights follow the seed argument
    a = load_backbone("random:tiny-t5", seed=7).model.state_dict()
    torch.manual_seed(456)
    b = load_backbone("random:tiny-t5", seed=7).model.state_dict()
    c = load_backbone("random:tiny-t5", seed=8).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
