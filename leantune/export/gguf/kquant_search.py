"""The scale searches of llama.cpp's k-quants (ggml-quants.c make_qkx2_quants / make_qx_quants and their
imatrix-weighted forms), vectorised over every group at once: for each group of values, the scale (and min)
whose rounding error, weighted per value, is smallest. kquants.py packs the codes they choose into blocks.
Reference: https://github.com/ggml-org/llama.cpp/blob/master/ggml/src/ggml-quants.c
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

_F32 = np.float32


def _round(x: Tensor) -> Tensor:
    # ggml's nearest_int adds 1.5*2^23 and reads the mantissa: round half to even, as torch.round.
    return torch.round(x)


def _moments(x: Tensor, w: Tensor, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """sum w*q, sum w*q^2, sum w*q*x per row, in float64 for the error algebra that follows."""
    wq = w * q
    return wq.sum(1).double(), (wq * q).sum(1).double(), (wq * x).sum(1).double()


def asymmetric_search(x: Tensor, w: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
                      mad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Best (scale, min, q) with x ~ scale*q - min, q in [0, nmax], for each row of x (G, n).

    Tries nstep+1 inverse scales (rmin + rdelta*i + nmax) / (max - lo); for each rounding of (x - lo),
    the weighted least-squares scale s and offset o; keeps the one with the lowest weighted squared error
        E = s^2 Swq2 + o^2 Sw + Swx2 + 2 s o Swq - 2 s Swqx - 2 o Swx,
    evaluated from the sums already at hand (the reference sums the residuals; equal up to rounding).
    As in the reference, an accepted offset becomes the `lo` of the candidates after it.
    mad=True (Q2_K's reference) ranks candidates by the weighted absolute error sum w |s q + o - x|
    instead, summed from the residuals. Only the winning (inverse scale, lo) is remembered per row; its codes are recomputed at the end.
    """
    lo = x.amin(1).clamp(max=0)  # the offset never goes above 0: zero stays representable
    hi = x.amax(1)
    flat = hi == lo
    sum_w, sum_x, sum_xx = w.sum(1).double(), (w * x).sum(1).double(), (w * x * x).sum(1).double()

    def codes(numer: float | Tensor, low: Tensor) -> Tensor:
        # numer as a tensor every time: scalar/tensor and tensor/tensor division may round differently,
        # and the winner's codes are recomputed at the end from the same expression.
        numer = torch.full_like(low, numer) if isinstance(numer, float) else numer
        span = torch.where(flat, torch.ones_like(hi), hi - low)
        return _round((numer / span)[:, None] * (x - low[:, None])).clamp_(0, nmax)

    def error(s: Tensor, o: Tensor, q: Tensor, sq: Tensor, sq2: Tensor, sxq: Tensor) -> Tensor:
        if mad:
            return (w * (s.float()[:, None] * q + o.float()[:, None] - x).abs()).sum(1).double()
        return s * s * sq2 + o * o * sum_w + sum_xx + 2 * s * o * sq - 2 * s * sxq - 2 * o * sum_x

    first = float(nmax)
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    scale, offset = (span / first).double(), lo.double()  # the plain min/max fit
    q0 = codes(first, lo)
    best = error(scale, offset, q0, *_moments(x, w, q0))
    pick, pick_lo = torch.full_like(lo, first), lo
    for step in range(nstep + 1):
        numer = float(_F32(rmin) + _F32(rdelta) * _F32(step) + _F32(nmax))  # float32 as in C
        q = codes(numer, lo)
        sq, sq2, sxq = _moments(x, w, q)
        det = sum_w * sq2 - sq * sq
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        this_s = (sum_w * sxq - sum_x * sq) / det
        this_o = (sq2 * sum_x - sq * sxq) / det
        positive = this_o > 0
        this_o = torch.where(positive, torch.zeros_like(this_o), this_o)
        this_s = torch.where(positive, sxq / torch.where(sq2 > 0, sq2, torch.ones_like(sq2)), this_s)
        err = error(this_s, this_o, q, sq, sq2, sxq)
        better = ok & (err < best)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_s, scale)
        offset = torch.where(better, this_o, offset)
        pick = torch.where(better, torch.full_like(pick, numer), pick)
        pick_lo = torch.where(better, lo, pick_lo)
        lo = torch.where(better, this_o.float(), lo)
    q = codes(pick, pick_lo)
    scale = torch.where(flat, torch.zeros_like(scale), scale).float()
    q = torch.where(flat[:, None], torch.zeros_like(q), q)
    return scale, (-offset).float(), q


def symmetric_search(x: Tensor, nmax: int, w: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Best (scale, q) with x ~ scale*q, q in [-nmax, nmax-1], weights w (default x^2: rmse_type 1), rows of
    x (G, n) (make_qx_quants).

    Starts from iscale = -nmax / x[argmax |x|] and tries 18 nearby ones (nmax +- 0.1*k), keeping the one
    that maximises (sum w q x)^2 / sum w q^2; returns the scale and q + nmax.
    """
    idx = x.abs().argmax(1, keepdim=True)  # first maximum, as C's strict '>'
    peak = x.gather(1, idx).squeeze(1)
    zero = peak.abs() < 1e-15
    peak = torch.where(zero, torch.ones_like(peak), peak)
    w = x * x if w is None else w

    def codes(numer: float | Tensor) -> Tensor:  # numer always a tensor: see asymmetric_search
        numer = torch.full_like(peak, numer) if isinstance(numer, float) else numer
        return _round((-numer / peak)[:, None] * x).clamp_(-nmax, nmax - 1)

    def sums(numer: float) -> tuple[Tensor, Tensor]:
        q = codes(numer)
        wq = w * q
        return (wq * x).sum(1), (wq * q).sum(1)

    sum_lx, sum_l2 = sums(float(nmax))
    scale = torch.where(sum_l2 > 0, sum_lx / torch.where(sum_l2 > 0, sum_l2, 1), 0)
    best = scale * sum_lx
    pick = torch.full_like(peak, float(nmax))
    for k in range(-9, 10):
        if k == 0:
            continue
        numer = float(_F32(nmax) + _F32(0.1) * _F32(k))
        slx, sl2 = sums(numer)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        new_scale = slx / torch.where(better, sl2, torch.ones_like(sl2))
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, new_scale * slx, best)
        pick = torch.where(better, torch.full_like(pick, numer), pick)
    q = codes(pick)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    q = torch.where(zero[:, None], torch.zeros_like(q), q)
    return scale, q + nmax


def _refine(x: Tensor, w: Tensor, q: Tensor, lo: int, hi: int, q3: bool) -> tuple[Tensor, Tensor, Tensor]:
    """ggml's coordinate descent on the integer codes q (G, n) of x ~ s*q, s = sum wqx / sum wq^2:
    up to 5 passes over the elements in order; each moves one code to round(x_i * Sq2' / Sqx') (the sums
    without element i) when that raises (sum wqx)^2 / sum wq^2. Sequential in i, vectorised over groups.
    q3=True is make_q3_quants' variant (checks sum wq^2 > 0 after the move), else make_qp_quants'.
    Returns (q, sum wqx, sum wq^2)."""
    q = q.clone()
    sumlx, suml2 = (w * x * q).sum(1), (w * q * q).sum(1)
    for _ in range(5):
        changed = torch.zeros_like(sumlx, dtype=torch.bool)
        for i in range(x.shape[1]):
            xi, wi, li = x[:, i], w[:, i], q[:, i]
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = (slx > 0) if q3 else (slx > 0) & (sl2 > 0)
            new_l = _round(xi * sl2 / torch.where(slx > 0, slx, torch.ones_like(slx))).clamp(lo, hi)
            slx2, sl22 = slx + wi * xi * new_l, sl2 + wi * new_l * new_l
            take = ok & (new_l != li) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
            if q3:
                take &= sl22 > 0
            q[:, i] = torch.where(take, new_l, li)
            sumlx, suml2 = torch.where(take, slx2, sumlx), torch.where(take, sl22, suml2)
            changed |= take
        if not bool(changed.any()):
            break
    return q, sumlx, suml2


def q3_search(x: Tensor, nmax: int) -> tuple[Tensor, Tensor]:
    """make_q3_quants(do_rmse): codes round(-nmax/x[argmax|x|] * x) in [-nmax, nmax-1], refined with
    weights x^2; returns (scale, q + nmax). Rows of x (G, n)."""
    idx = x.abs().argmax(1, keepdim=True)
    peak = x.gather(1, idx).squeeze(1)
    zero = peak.abs() < 1e-15
    peak = torch.where(zero, torch.ones_like(peak), peak)
    q = _round((-nmax / peak)[:, None] * x).clamp_(-nmax, nmax - 1)
    q, sumlx, suml2 = _refine(x, x * x, q, -nmax, nmax - 1, q3=True)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), 0)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    q = torch.where(zero[:, None], torch.zeros_like(q), q + nmax)
    return scale, q


def qp_search(x: Tensor, nmax: int, w: Tensor) -> tuple[Tensor, Tensor]:
    """make_qp_quants: x >= 0 (G, n) ~ scale * q, q in [0, nmax], weighted by w: the best of 9 inverse
    scales (nmax + 0.1 k) / max, then the coordinate descent. Fits a super-block's sub-block scales (or
    mins) under an importance matrix. Returns (scale, q)."""
    x = x.clamp(min=0)  # sub-block scales and mins are >= 0; C would wrap a negative code in a uint8
    top = x.amax(1)
    zero = top < 1e-15
    top = torch.where(zero, torch.ones_like(top), top)

    def mse(iscale: Tensor) -> Tensor:
        q = _round(iscale[:, None] * x).clamp(max=nmax)
        return (w * (x - q / iscale[:, None]) ** 2).sum(1)

    iscale = nmax / top
    q = _round(iscale[:, None] * x)  # the first candidate is not clamped in C either (it cannot exceed nmax)
    best = (w * (x - q / iscale[:, None]) ** 2).sum(1)
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        cand = (_F32(0.1) * _F32(k) + _F32(nmax)) / top
        err = mse(cand)
        better = err < best
        best, iscale = torch.where(better, err, best), torch.where(better, cand, iscale)
    q = _round(iscale[:, None] * x).clamp(max=nmax)
    q, sumlx, suml2 = _refine(x, w, q, -(2 ** 30), nmax, q3=False)
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), 0)
    scale = torch.where(zero, torch.zeros_like(scale), scale)
    return scale, torch.where(zero[:, None], torch.zeros_like(q), q)
