"""The chunked cross-entropy equals torch's cross-entropy on materialised logits, value and gradients."""

import pytest
import torch
import torch.nn.functional as F

from leantune.ops.cross_entropy import causal_lm_loss, chunked_linear_cross_entropy


@pytest.mark.parametrize("chunk", [1, 7, 1024])
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_matches_materialised_logits(chunk, softcap):
    torch.manual_seed(0)
    h = torch.randn(37, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    z = h @ w.t()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    ref = F.cross_entropy(z, y, reduction="sum") / 100.0
    ref.backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    out = chunked_linear_cross_entropy(h, w, y, normalizer=100.0, chunk=chunk, softcap=softcap)
    (out * 3.0).backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(h.grad, 3.0 * gh)
    torch.testing.assert_close(w.grad, 3.0 * gw)


def test_causal_shift_and_ignore_index_match_hf_convention():
    torch.manual_seed(1)
    hidden = torch.randn(2, 9, 8, requires_grad=True)
    w = torch.randn(30, 8)
    labels = torch.randint(0, 30, (2, 9))
    labels[0, :4] = -100
    logits = hidden @ w.t()
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1), ignore_index=-100)
    loss, n = causal_lm_loss(hidden, w, labels, chunk=5)
    assert n == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    loss.backward()
    g = hidden.grad.clone()
    hidden.grad = None
    ref2 = F.cross_entropy((hidden @ w.t())[:, :-1].reshape(-1, 30), labels[:, 1:].reshape(-1), ignore_index=-100)
    ref2.backward()
    torch.testing.assert_close(g, hidden.grad, rtol=1e-5, atol=1e-7)


def test_bf16_weights_keep_fp32_loss():
    torch.manual_seed(2)
    h = torch.randn(20, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(64, 32, dtype=torch.bfloat16)
    y = torch.randint(0, 64, (20,))
    out = chunked_linear_cross_entropy(h, w, y, chunk=8)
    assert out.dtype == torch.float32
    ref = F.cross_entropy((h @ w.t()).float(), y)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    out.backward()
    assert h.grad.dtype == torch.bfloat16


def test_no_grad_path_skips_gradient_work():
    h = torch.randn(10, 4)
    w = torch.randn(12, 4)
    y = torch.randint(0, 12, (10,))
    with torch.no_grad():
        out = chunked_linear_cross_entropy(h, w, y)
    torch.testing.assert_close(out, F.cross_entropy(h @ w.t(), y))


def test_bf16_chunks_stay_bf16_and_match_fp64_to_bf16_resolution():
    """bf16 logits are never copied to fp32 (a (chunk, V) fp32 tensor is what the round trip cost), and the
    loss and both gradients still match an fp64 reference on the same bf16 inputs to bf16 resolution."""
    from torch.utils._python_dispatch import TorchDispatchMode

    torch.manual_seed(3)
    n, hid, vocab, chunk = 40, 32, 96, 16
    h = (torch.randn(n, hid) * 0.5).bfloat16().requires_grad_(True)
    w = torch.randn(vocab, hid).bfloat16().requires_grad_(True)
    y = torch.randint(0, vocab, (n,))
    wide = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == vocab and t.dtype != torch.bfloat16:
                    wide.append((str(func), t.dtype, tuple(t.shape)))
            return out

    with Watch():
        out = chunked_linear_cross_entropy(h, w, y, normalizer=50.0, chunk=chunk)
    assert not wide, wide
    out.backward()
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    ref = F.cross_entropy(h64 @ w64.t(), y, reduction="sum") / 50.0
    ref.backward()
    assert out.dtype == torch.float32 and h.grad.dtype == w.grad.dtype == torch.bfloat16
    assert abs(float(out.detach()) - float(ref.detach())) <= 1e-3 * abs(float(ref.detach()))
    for g, r in ((h.grad, h64.grad), (w.grad, w64.grad)):
        assert (g.double() - r).abs().max() <= 2e-2 * r.abs().max()  # a few bf16 roundings (measured 1%)

