"""The Triton kernels (leantune/ops/triton/) against the plain torch math, run by Triton's CPU interpreter.

Values and gradients, fp32 and bf16, shapes that are not multiples of the kernels' block sizes."""

import pytest
import torch
import torch.nn.functional as F

from .triton_interpreted import kernels

K = kernels()  # skips where triton is not installed
ce_rows, cross_entropy, rms_norm, swiglu = K.ce_rows, K.cross_entropy, K.rms_norm, K.swiglu

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_matches_torch_with_ignored_rows(dtype):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(7, 1000, generator=g) * 3).to(dtype)  # V=1000: not a power of two
    y = torch.randint(0, 1000, (7,), generator=g)
    y[2] = -100
    a = z.clone().requires_grad_()
    b = z.clone().float().requires_grad_()
    la = cross_entropy(a, y)
    lb = F.cross_entropy(b, y, ignore_index=-100)
    (la * 2).backward()
    (lb * 2).backward()
    assert la.dtype == torch.float32
    torch.testing.assert_close(la, lb, atol=1e-5, rtol=1e-5)
    assert a.grad.dtype == dtype
    torch.testing.assert_close(a.grad.float(), b.grad, **TOL[dtype])
    assert torch.all(a.grad[2] == 0)


def test_ce_rows_writes_the_gradient_over_the_logits_when_asked():
    z = torch.randn(3, 70)
    y = torch.tensor([5, 69, 0])
    expect = (torch.softmax(z, -1) - F.one_hot(y, 70)) * 0.5
    expect_loss = F.cross_entropy(z, y, reduction="none")
    loss = ce_rows(z, y, scale=0.5, grad_out=z)
    torch.testing.assert_close(loss, expect_loss)
    torch.testing.assert_close(z, expect, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_llama_math(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 96, generator=g).to(dtype)  # 96: not a power of two
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    dy = torch.randn(2, 5, 96, generator=g).to(dtype)

    def ref(x, w):  # transformers' LlamaRMSNorm
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return w * h.to(x.dtype)

    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    xb, wb = x.clone().double().requires_grad_(), w.clone().double().requires_grad_()
    ya = rms_norm(xa, wa, 1e-6)
    yb = ref(xb, wb)
    ya.backward(dy)
    yb.backward(dy.double())
    assert ya.dtype == dtype and xa.grad.dtype == dtype and wa.grad.dtype == dtype
    torch.testing.assert_close(ya, ref(x, w), **TOL[dtype])
    torch.testing.assert_close(xa.grad.double(), xb.grad, **TOL[dtype])
    torch.testing.assert_close(wa.grad.double(), wb.grad, **TOL[dtype])


def test_rmsnorm_frozen_weight_gets_no_gradient():
    x = torch.randn(3, 33, requires_grad=True)
    w = torch.ones(33)
    rms_norm(x, w, 1e-5).sum().backward()
    assert x.grad is not None and w.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_torch(dtype):
    g = torch.Generator().manual_seed(2)
    gate = torch.randn(3, 1500, generator=g).to(dtype)  # 4500 elements: not a multiple of the block
    up = torch.randn(3, 1500, generator=g).to(dtype)
    dh = torch.randn(3, 1500, generator=g).to(dtype)
    ga, ua = gate.clone().requires_grad_(), up.clone().requires_grad_()
    gb, ub = gate.double().requires_grad_(), up.double().requires_grad_()
    ha = swiglu(ga, ua)
    hb = F.silu(gb) * ub
    ha.backward(dh)
    hb.backward(dh.double())
    assert ha.dtype == dtype and ga.grad.dtype == dtype
    torch.testing.assert_close(ha.double(), hb, **TOL[dtype])
    torch.testing.assert_close(ga.grad.double(), gb.grad, **TOL[dtype])
    torch.testing.assert_close(ua.grad.double(), ub.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_with_the_kernel_matches_its_torch_path(dtype):
    from leantune.ops import cross_entropy as ce

    g = torch.Generator().manual_seed(3)
    h = torch.randn(13, 24, generator=g).to(dtype)       # 13 rows in chunks of 5: a ragged last chunk
    w = (torch.randn(333, 24, generator=g) * 0.3).to(dtype)
    y = torch.randint(0, 333, (13,), generator=g)

    def run(fused):
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        ce.use_fused_rows(ce_rows if fused else None)
        try:
            loss = ce.chunked_linear_cross_entropy(hh, ww, y, normalizer=20.0, chunk=5)
        finally:
            ce.use_fused_rows(None)
        (loss * 3).backward()
        return loss, hh.grad, ww.grad

    (lk, hk, wk), (lt, ht, wt) = run(True), run(False)
    torch.testing.assert_close(lk, lt, **TOL[dtype])
    assert hk.dtype == dtype and wk.dtype == dtype
    torch.testing.assert_close(hk.float(), ht.float(), **TOL[dtype])
    torch.testing.assert_close(wk.float(), wt.float(), **TOL[dtype])
