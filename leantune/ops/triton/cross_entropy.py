"""Cross-entropy over a logits chunk in one Triton pass: loss, softmax and gradient (Liger's fused CE shape).

One program per row reads the row twice: an online max / sum-of-exponentials in fp32, then
`(softmax - onehot(y)) * scale` written back in the logits' dtype, over the logits themselves when
`grad_out` is the input (the chunked loss does so: the chunk's (c, V) block is the only tensor of size V,
and after this call it holds the gradient, ready for the two GEMMs of ops/cross_entropy.py). Rows whose
label is `ignore_index` (-100) add 0 to the loss and get a zero gradient.

    loss_i = logsumexp(z_i) - z_i[y_i]                        (fp32)
    g_i    = (softmax(z_i) - onehot(y_i)) * scale             (computed in fp32, stored in z's dtype)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

IGNORE_INDEX = -100


@triton.jit
def _ce_rows(z_ptr, g_ptr, y_ptr, loss_ptr, stride_z, stride_g, V, scale, ignore_index,
             BLOCK: tl.constexpr, WRITE_GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_ptr += row * stride_z
    g_ptr += row * stride_g
    y = tl.load(y_ptr + row).to(tl.int64)
    valid = y != ignore_index
    y_safe = tl.where(valid, y, 0)
    m = float("-inf")
    d = 0.0
    for s in range(0, V, BLOCK):
        cols = s + tl.arange(0, BLOCK)
        x = tl.load(z_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        m = m_new
    zy = tl.load(z_ptr + y_safe).to(tl.float32)
    loss = tl.log(d) + m - zy
    tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
    if WRITE_GRAD:
        k = tl.where(valid, scale, 0.0)
        for s in range(0, V, BLOCK):
            cols = s + tl.arange(0, BLOCK)
            mask = cols < V
            x = tl.load(z_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - m) / d - tl.where(cols == y_safe, 1.0, 0.0)
            tl.store(g_ptr + cols, (g * k).to(g_ptr.dtype.element_ty), mask=mask)


def ce_rows(logits: Tensor, labels: Tensor, *, scale: float = 1.0, grad_out: Tensor | None = None,
            ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Per-row losses (fp32, (c,)) of `logits` (c, V) against `labels` (c,); with `grad_out` (c, V) (it may be
    `logits` itself), also writes `(softmax - onehot) * scale` there."""
    assert logits.dim() == 2 and logits.stride(1) == 1, "logits: a (c, V) tensor with contiguous rows"
    c, v = logits.shape
    loss = torch.empty(c, dtype=torch.float32, device=logits.device)
    if c == 0:
        return loss
    g = grad_out if grad_out is not None else logits
    assert g.shape == logits.shape and g.stride(1) == 1
    block = min(triton.next_power_of_2(v), 32768 // logits.element_size())
    _ce_rows[(c,)](logits, g, labels.contiguous(), loss, logits.stride(0), g.stride(0), v, float(scale), ignore_index,
                   BLOCK=block, WRITE_GRAD=grad_out is not None)
    return loss


class TritonCrossEntropy(torch.autograd.Function):
    """Mean token cross-entropy of (N, V) logits against (N,) labels, ignoring `ignore_index` (as
    F.cross_entropy's default 'mean'); the gradient is computed in the forward pass."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
        z = logits.contiguous()
        n = int((labels != ignore_index).sum())
        grad = torch.empty_like(z) if ctx.needs_input_grad[0] else None
        loss = ce_rows(z, labels, scale=1.0 / max(n, 1), grad_out=grad, ignore_index=ignore_index)
        ctx.save_for_backward(grad)
        return loss.sum() / max(n, 1)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * grad_out.to(grad.dtype), None, None


def cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    return TritonCrossEntropy.apply(logits, labels, ignore_index)
