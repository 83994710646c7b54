"""SwiGLU's gate, silu(gate) * up, in Triton: one elementwise pass each way, fp32 inside, stored in the inputs' dtype.

    h      = g * sigmoid(g) * u
    dL/dg  = dh * u * s * (1 + g * (1 - s)),   s = sigmoid(g)
    dL/du  = dh * g * s

Saves gate and up (the two (N, I) tensors the torch form saves too) and no silu(gate): the backward
recomputes the sigmoid, so one (N, I) tensor fewer lives between forward and backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLOCK = 1024


@triton.jit
def _swiglu_fwd(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    tl.store(dg_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)
    tl.store(du_ptr + offs, (dh * g * s).to(du_ptr.dtype.element_ty), mask=mask)


class TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        assert gate.shape == up.shape and gate.dtype == up.dtype, "gate and up: same shape and dtype"
        g, u = gate.contiguous(), up.contiguous()
        h = torch.empty_like(g)
        n = g.numel()
        if n:
            _swiglu_fwd[(triton.cdiv(n, _BLOCK),)](g, u, h, n, BLOCK=_BLOCK)
        ctx.save_for_backward(g, u)
        return h

    @staticmethod
    def backward(ctx, dh: Tensor):
        g, u = ctx.saved_tensors
        dh = dh.to(g.dtype).contiguous()
        dg, du = torch.empty_like(g), torch.empty_like(u)
        n = g.numel()
        if n:
            _swiglu_bwd[(triton.cdiv(n, _BLOCK),)](dh, g, u, dg, du, n, BLOCK=_BLOCK)
        return dg, du


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return TritonSwiGLU.apply(gate, up)
