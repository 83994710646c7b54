"""RMSNorm (Llama's form) in Triton: statistics in fp32, output in the input dtype.

    rstd = 1 / sqrt(mean(x^2) + eps)                 (fp32, one per row, saved for backward)
    y    = w * (x * rstd).to(x.dtype)                (rounded once to x's dtype)
    dx   = rstd * (dxh - xh * mean(dxh * xh)),  dxh = dy * w,  xh = x * rstd      (fp32, stored in x's dtype)
    dw   = sum_rows dy * xh.to(x.dtype)              (fp32 partial sums per program, added up by torch)

One program per row in forward; in backward each program walks a contiguous run of rows and keeps its own dw
partial, so no (M, N) fp32 tensor is made. A frozen weight (LoRA) skips dw.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, stride, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / N + eps)
    xh = (x * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride + cols, (xh * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rms_bwd(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_ptr, stride, M, N, ROWS_PER_PROG,
             BLOCK: tl.constexpr, WANT_DW: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    start = pid * ROWS_PER_PROG
    stride64 = stride.to(tl.int64)
    for r in range(start, tl.minimum(start + ROWS_PER_PROG, M)):
        off = r * stride64
        x = tl.load(x_ptr + off + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + off + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r)
        xh = x * rstd
        dxh = dy * w
        dx = rstd * (dxh - xh * (tl.sum(dxh * xh, 0) / N))
        tl.store(dx_ptr + off + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if WANT_DW:
            dw += dy * xh.to(dx_ptr.dtype.element_ty).to(tl.float32)
    if WANT_DW:
        tl.store(dw_ptr + pid * N + cols, dw, mask=mask)


class TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        m, n = x2.shape
        y = torch.empty_like(x2)
        rstd = torch.empty(m, dtype=torch.float32, device=x.device)
        block = triton.next_power_of_2(n)
        if m:
            _rms_fwd[(m,)](x2, weight, y, rstd, x2.stride(0), n, float(eps), BLOCK=block)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.block = block
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2, weight, rstd = ctx.saved_tensors
        m, n = x2.shape
        dy2 = dy.reshape(m, n).to(x2.dtype).contiguous()
        dx = torch.empty_like(x2)
        want_dw = ctx.needs_input_grad[1]
        progs = max(1, min(m, 256))
        per = triton.cdiv(m, progs) if m else 1
        progs = triton.cdiv(m, per) if m else 1
        dw = torch.zeros((progs, n), dtype=torch.float32, device=x2.device) if want_dw else None
        if m:
            _rms_bwd[(progs,)](dy2, x2, weight, rstd, dx, dw if want_dw else dx, x2.stride(0), m, n, per,
                               BLOCK=ctx.block, WANT_DW=want_dw)
        gw = dw.sum(0).to(weight.dtype) if want_dw else None
        return dx.view(dy.shape), gw, None


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    return TritonRMSNorm.apply(x, weight, eps)
