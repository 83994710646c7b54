"""The fused LoRA node (ops/lora.py) against the same update written module by module."""

import pytest
import torch
from torch import nn

from leantune.adapters.lora import LoraLinear
from leantune.ops.lora import lora_linear


def reference(x, weight, bias, a, b, s, x_lora=None):
    xl = x if x_lora is None else x_lora
    return nn.functional.linear(x, weight, bias) + (xl @ a.t()) @ b.t() * s


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
def test_forward_and_every_gradient_match_the_unfused_form(bias, dropout):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 12, dtype=torch.float64)
    b_vec = torch.randn(7, dtype=torch.float64, requires_grad=True) if bias else None
    a = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 4, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(3, 5, 12) > 0.3).double() if dropout else None
    leaves = [t for t in (x, b_vec, a, b) if t is not None]
    grads = []
    for f in (lora_linear, reference):
        xl = x * mask if dropout else None  # a differentiable stand-in for dropout(x)
        y = f(x, weight, b_vec, a, b, 0.7, x_lora=xl) if f is lora_linear else f(x, weight, b_vec, a, b, 0.7, xl)
        g = torch.autograd.grad((y * torch.linspace(-1, 1, 7, dtype=torch.float64)).sum(), leaves)
        grads.append((y.detach(), g))
    (y1, g1), (y2, g2) = grads
    torch.testing.assert_close(y1, y2, rtol=0, atol=1e-12)
    for u, v in zip(g1, g2):
        torch.testing.assert_close(u, v, rtol=0, atol=1e-12)


def test_lora_linear_takes_the_fused_node_where_the_base_is_a_frozen_linear_in_the_activations_dtype():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 6).requires_grad_(False), rank=2, alpha=4)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 3, 8, requires_grad=True)
    assert layer(x).grad_fn.name().endswith("_LoraLinearBackward")
    layer.base_layer.weight.requires_grad_(True)  # a trainable base must get its gradient: unfused
    assert not layer(x).grad_fn.name().endswith("_LoraLinearBackward")
    layer.base_layer.weight.requires_grad_(False)
    mixed = LoraLinear(nn.Linear(8, 6).requires_grad_(False).to(torch.bfloat16), rank=2, alpha=4)
    assert mixed(x.bfloat16()).grad_fn.name().endswith("_LoraLinearBackward")  # fp32 masters, cast per call
    layer.merge()
    assert not layer(x).grad_fn.name().endswith("_LoraLinearBackward")


def test_bf16_activations_with_fp32_masters_compute_in_bf16_and_give_fp32_gradients():
    """The fused node over a bf16 base with fp32 A/B equals the same arithmetic done by hand in bf16 with
    A and B cast (what autocast would run), and the masters' gradients come back fp32, equal to the bf16
    ones upcast."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(10, 16, dtype=torch.bfloat16)
    a = torch.randn(4, 16, requires_grad=True)
    b = torch.randn(10, 4, requires_grad=True)
    probe = torch.linspace(-1, 1, 10, dtype=torch.bfloat16)
    y = lora_linear(x, weight, None, a, b, 2.0)
    gx, ga, gb = torch.autograd.grad((y * probe).sum(), (x, a, b))
    y_ref = reference(x, weight, None, a.bfloat16(), b.bfloat16(), 2.0)
    gx_ref, ga_ref, gb_ref = torch.autograd.grad((y_ref * probe).sum(), (x, a, b))
    assert y.dtype == gx.dtype == torch.bfloat16 and ga.dtype == gb.dtype == torch.float32
    for u, v in ((y, y_ref), (gx, gx_ref), (ga, ga_ref), (gb, gb_ref)):
        # one bf16 rounding apart at most where the two sum in another order: 2^-8 of the scale
        assert (u.float() - v.float()).abs().max() <= 2 ** -7 * v.float().abs().max()
