"""Weight-only integer quantization (W4A16 / W8A16) of a Linear: the group grid, the GPTQ solver, AWQ's
clipping search, and the int32 packings that GPTQ, AWQ and compressed-tensors checkpoints use. Pure torch.

The grid, per group of `group_size` input columns of W (out, in), with maxq = 2^bits - 1:
    sym   scale = max|w| / (maxq / 2),          zero = (maxq + 1) / 2    (GPTQ's; compressed-tensors' too)
    asym  scale = (max(w, 0) - min(w, 0)) / maxq, zero = round(-min / scale)  (AWQ's)
    q = clamp(round(w / scale) + zero, 0, maxq)     w_hat = (q - zero) * scale
Scales are rounded to the dtype they are stored in before use, so the solver sees the grid a loader sees.

GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323), Algorithm 1 in blocks: with H = 2 X^T X / N
(X the layer's calibration inputs, N tokens), damped by `damp` x mean(diag H), and U the upper Cholesky
factor of H^-1, the columns are quantized left to right and each column's error, divided by U[i, i], is
pushed onto the columns not yet quantized along U[i, i:]. Act-order is the "static" (group-aware) kind
vLLM loads: every group's (scale, zero) is fixed from the unquantized weights first, then the columns
are solved in descending diag(H) order; groups stay contiguous in the file and g_idx is i // group_size.

Packings (element e of a packed run sits at bits [e*bits, (e+1)*bits) of its int32):
    gptq v1        qweight (in*bits/32, out) packed along in;  qzeros (groups, out*bits/32) hold zero - 1
    awq gemm       qweight (in, out/8) packed along out with column order AWQ_ORDER; qzeros likewise, no offset
    pack-quantized weight_packed (out, in*bits/32) packed along in; zero point (out/8, groups) along out
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)     # pack slot p of an AWQ int32 holds column AWQ_ORDER[p] of its 8


# ---------------------------------------------------------------------------------------------------------
# The grid


def group_params(w: Tensor, bits: int, sym: bool, scale_dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor]:
    """(scale, zero) of each row of `w` (rows, cols) over all its columns: (rows,), (rows,)."""
    # amin/amax: 15x faster than min/max(dim) (which also find indices) or aminmax over short rows, measured
    lo, hi = w.amin(dim=1), w.amax(dim=1)
    return range_params(lo, hi, bits, sym, scale_dtype)


def range_params(lo: Tensor, hi: Tensor, bits: int, sym: bool, scale_dtype: torch.dtype = torch.float16
                 ) -> tuple[Tensor, Tensor]:
    """(scale, zero) of groups whose smallest and largest values are `lo`, `hi` (any shape, the same)."""
    maxq = 2 ** bits - 1
    lo = lo.clamp(max=0)
    hi = hi.clamp(min=0)
    if sym:
        hi = torch.maximum(lo.abs(), hi)
        scale = hi / (maxq / 2)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(scale_dtype).float()
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    scale = (hi - lo) / maxq
    scale = torch.where(scale == 0, torch.ones_like(scale), scale).to(scale_dtype).float()
    zero = torch.round(-lo / scale).clamp(0, maxq)
    return scale, zero


def quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """Integer codes of `w` (..., cols) on the grid of broadcastable `scale`, `zero`."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


def fake_quant(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    return (quantize(w, scale, zero, bits) - zero) * scale


def n_groups(n_in: int, group_size: int) -> int:
    return 1 if group_size == -1 else n_in // group_size


def rtn(w: Tensor, bits: int, group_size: int, sym: bool, scale_dtype=torch.float16) -> tuple[Tensor, Tensor, Tensor]:
    """Round-to-nearest per group: (codes (out, in), scales (out, groups), zeros (out, groups))."""
    out, n_in = w.shape
    g = n_groups(n_in, group_size)
    wg = w.float().reshape(out * g, n_in // g)                                 # (out*groups, group)
    scale, zero = group_params(wg, bits, sym, scale_dtype)
    q = quantize(wg, scale[:, None], zero[:, None], bits)
    return q.reshape(out, n_in), scale.reshape(out, g), zero.reshape(out, g)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """(out, in) weights from codes (out, in) and per-group scale/zero (out, groups)."""
    out, n_in = q.shape
    g = scale.shape[1]
    q = q.float().reshape(out, g, n_in // g)
    return ((q - zero.float()[..., None]) * scale.float()[..., None]).reshape(out, n_in)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Column-by-column loops of small ops run faster on one thread: on a busy 2-core machine two threads made
    the GPTQ loop 27x slower (11.3 s vs 0.41 s for a 576x576 weight, measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------------------
# GPTQ


def hessian(x: Tensor) -> Tensor:
    """2 X^T X / N of inputs x (..., in), in float64-free fp32: (in, in)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return (2.0 / x.shape[0]) * (x.T @ x)


@one_thread()
def gptq(w: Tensor, h: Tensor, bits: int, group_size: int, *, sym: bool = True, damp: float = 0.01,
         act_order: bool = False, block: int = 128, scale_dtype=torch.float16, static_groups: bool = False
         ) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of one Linear's weight `w` (out, in) against Hessian `h` (in, in) (see the module docstring).

    `static_groups`: every group's grid from the unsolved weights (as act-order does, and as llm-compressor
    0.14 does for every GPTQ) instead of from the group's columns as updated when the solve reaches it.

    Returns (codes (out, in), scales (out, groups), zeros (out, groups)) in the original column order."""
    w = w.detach().float().clone()
    out, n = w.shape
    gs = n if group_size == -1 else group_size
    maxq = 2 ** bits - 1
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0                       # an input never seen: any value is as good
    h[dead, dead] = 1
    w[:, dead] = 0
    g = n // gs
    st = torch.zeros(g, out)                        # scales, zeros: (groups, out)
    zt = torch.zeros(g, out)
    perm = torch.arange(n)
    static = act_order or static_groups
    if static:
        for j in range(g):                          # static act-order: the grid comes from the unsolved weights
            st[j], zt[j] = group_params(w[:, j * gs:(j + 1) * gs], bits, sym, scale_dtype)
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # (in, in)
    group_of = (perm // gs).tolist()                # the group of each solved column
    wt = w.T.contiguous()                           # (in, out): column i of W is row i here, contiguous
    qt = torch.empty(n, out)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        wb = wt[i1:i2].clone()                      # (b, out)
        err = torch.empty_like(wb)
        ub = u[i1:i2, i1:i2]
        diag = ub.diagonal().tolist()
        for k in range(i2 - i1):
            i = i1 + k
            j = group_of[i]
            if not static and i % gs == 0:       # lazy grid: from the group's columns as updated so far
                st[j], zt[j] = group_params(_rows_now(wt, wb, i1, i, gs).T, bits, sym, scale_dtype)
            sc, zr = st[j], zt[j]
            col = wb[k]
            qc = torch.round(col / sc).add_(zr).clamp_(0, maxq)
            qt[i] = qc
            e = err[k]
            torch.sub(col, (qc - zr).mul_(sc), out=e)
            e.div_(diag[k])
            if k + 1 < i2 - i1:
                wb[k + 1:].sub_(torch.outer(ub[k, k + 1:], e))
        wt[i2:] -= u[i1:i2, i2:].T @ err            # (rest, b) @ (b, out): the block's error, pushed on
    if act_order:
        qt = qt[torch.argsort(perm)]
    return qt.T.contiguous(), st.T.contiguous(), zt.T.contiguous()


def _rows_now(wt: Tensor, wb: Tensor, i1: int, i: int, gs: int) -> Tensor:
    """Columns i .. i+gs of the weight as updated so far, as rows of W^T: the current block's part from `wb`,
    the rest (later blocks, already updated by the earlier ones) from `wt`."""
    b = wb.shape[0]
    inside = wb[i - i1: min(i - i1 + gs, b)]
    return torch.cat([inside, wt[i1 + b: i + gs]]) if i + gs > i1 + b else inside


# ---------------------------------------------------------------------------------------------------------
# AWQ's weight clipping search (Lin et al. 2023, https://arxiv.org/abs/2306.00978, section 3.2)


@torch.no_grad()
@one_thread()
def clip_search(w: Tensor, x: Tensor, bits: int, group_size: int, *, steps: int = 20, shrink: float = 0.5,
                sym: bool = False, chunk: int = 256) -> Tensor:
    """The weight with each (row, group) clipped to r * max|w| for the r in [1 - shrink, 1] whose fake-quantized
    group output on inputs x (tokens, in) is closest to the unclipped one."""
    out, n = w.shape
    gs = n if group_size == -1 else group_size
    g = n // gs
    xg = x.float().reshape(-1, g, gs)                                       # (T, groups, gs)
    result = w.float().clone()
    for r0 in range(0, out, chunk):
        wg = w[r0:r0 + chunk].float().reshape(-1, g, gs)                    # (o, groups, gs)
        ref = torch.einsum("tgk,ogk->ogt", xg, wg)                          # (o, groups, T)
        lo, hi = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)       # (o, groups, 1)
        amax = torch.maximum(-lo, hi)
        best = torch.full(amax.shape, float("inf"))
        best_max = amax.clone()
        for s in range(steps):
            m = amax * (1 - shrink * s / steps)
            c = wg.clamp(-m, m)
            # clamping is monotone: the clipped group's min and max are the clipped min and max, no reduction
            sc, z = range_params(lo.clamp(-m, m), hi.clamp(-m, m), bits, sym)
            deq = fake_quant(c, sc, z, bits)
            errs = (torch.einsum("tgk,ogk->ogt", xg, deq) - ref).pow(2).mean(-1, keepdim=True)
            better = errs < best
            best = torch.where(better, errs, best)
            best_max = torch.where(better, m, best_max)
        result[r0:r0 + chunk] = wg.clamp(-best_max, best_max).reshape(-1, n)
    return result


# ---------------------------------------------------------------------------------------------------------
# Packing


def pack_rows(q: Tensor, bits: int) -> Tensor:
    """Codes (rows, cols) in [0, 2^bits) -> int32 (rows, cols*bits/32), element c at bits (c % k) * bits of
    word c // k (k = 32 / bits): packed along the last dim."""
    rows, cols = q.shape
    k = 32 // bits
    u = q.to(torch.int64).reshape(rows, cols // k, k)                      # (rows, words, k)
    shifts = torch.arange(k, dtype=torch.int64) * bits
    words = (u << shifts).sum(-1)                                          # < 2^32, fits int64
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def unpack_rows(p: Tensor, bits: int) -> Tensor:
    """The inverse of pack_rows: int32 (rows, words) -> codes (rows, words*32/bits) as int64."""
    k = 32 // bits
    shifts = torch.arange(k, dtype=torch.int64) * bits
    u = (p.to(torch.int64) & 0xFFFFFFFF)[..., None] >> shifts               # (rows, words, k)
    return (u & (2 ** bits - 1)).reshape(p.shape[0], -1)


def pack_gptq(q: Tensor, scale: Tensor, zero: Tensor, bits: int) -> dict[str, Tensor]:
    """GPTQ v1 tensors of one Linear from codes (out, in), scales/zeros (out, groups)."""
    out, n = q.shape
    g = scale.shape[1]
    return {"qweight": pack_rows(q, bits).T.contiguous(),                     # (in*bits/32, out)
            "qzeros": pack_rows((zero - 1).T.contiguous(), bits),             # (groups, out*bits/32)
            "scales": scale.T.contiguous().half(),                            # (groups, out)
            "g_idx": torch.arange(n, dtype=torch.int32) // (n // g)}


def unpack_gptq(t: dict[str, Tensor], bits: int) -> tuple[Tensor, Tensor, Tensor]:
    q = unpack_rows(t["qweight"].T.contiguous(), bits)                        # (out, in)
    zero = unpack_rows(t["qzeros"], bits).T + 1                               # (out, groups)
    return q, t["scales"].T.float(), zero.float()


def _awq_order(x: Tensor) -> Tensor:
    """Columns (.., out) reordered so that pack slot p of each 8 holds column AWQ_ORDER[p]."""
    r, c = x.shape
    return x.reshape(r, c // 8, 8)[:, :, list(AWQ_ORDER)].reshape(r, c)


def _awq_unorder(x: Tensor) -> Tensor:
    r, c = x.shape
    inverse = [AWQ_ORDER.index(i) for i in range(8)]
    return x.reshape(r, c // 8, 8)[:, :, inverse].reshape(r, c)


def pack_awq(q: Tensor, scale: Tensor, zero: Tensor, order: tuple[int, ...] = AWQ_ORDER) -> dict[str, Tensor]:
    """AWQ GEMM tensors (4-bit) of one Linear. `order` exists for the tests' wrong-order control."""
    def packed(x: Tensor) -> Tensor:                                          # (rows, out) -> (rows, out/8)
        r, c = x.shape
        return pack_rows(x.reshape(r, c // 8, 8)[:, :, list(order)].reshape(r, c), 4)
    return {"qweight": packed(q.T.contiguous()), "qzeros": packed(zero.T.contiguous()),
            "scales": scale.T.contiguous().half()}


def unpack_awq(t: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    q = _awq_unorder(unpack_rows(t["qweight"], 4)).T                          # (out, in)
    zero = _awq_unorder(unpack_rows(t["qzeros"], 4)).T
    return q, t["scales"].T.float(), zero.float()


def pack_ct(q: Tensor, scale: Tensor, zero: Tensor, bits: int, sym: bool, scale_dtype) -> dict[str, Tensor]:
    """compressed-tensors pack-quantized tensors of one Linear (codes stored with the +2^(bits-1) offset,
    which is our unsigned code; a zero point likewise, packed along out)."""
    t = {"weight_packed": pack_rows(q, bits), "weight_scale": scale.to(scale_dtype),
         "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64)}
    if not sym:
        t["weight_zero_point"] = pack_rows(zero.T.contiguous(), bits).T.contiguous()   # (out*bits/32, groups)
    return t


def unpack_ct(t: dict[str, Tensor], bits: int) -> tuple[Tensor, Tensor, Tensor]:
    q = unpack_rows(t["weight_packed"], bits)
    scale = t["weight_scale"].float()
    if "weight_zero_point" in t:
        zero = unpack_rows(t["weight_zero_point"].T.contiguous(), bits).T.float()
    else:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    return q[:, :int(t["weight_shape"][1])], scale, zero


def bits_per_weight(bits: int, group_size: int, n_in: int, sym: bool) -> float:
    """Stored bits per weight of one packed Linear: the codes plus a 16-bit scale (and a zero) per group."""
    g = n_in if group_size == -1 else group_size
    return bits + (16 + (0 if sym else bits)) / g
