"""k-quants: our blocks decode with gguf's own dequantizer, keep round-to-nearest error bounds, and
match a line-by-line port of llama.cpp's reference quantizer (quantize_row_q{4,5,6}_K_ref).

llama-cpp-python is not installed here (a 15-minute compile), so the reference is a scalar port of
ggml-quants.c below, kept deliberately loop-for-loop (float32 throughout, sequential sums) and slow.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize  # noqa: E402

from leantune.export.gguf.kquants import BYTES_PER_BLOCK, quantize_k  # noqa: E402

F = np.float32
KTYPES = ["Q4_K", "Q5_K", "Q6_K"]


def _weights_like_llm(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Gaussian weights with a few outliers and an all-zero row: the cases that bite quantizers."""
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(F)
    x[1, 5] = 0.5
    x[2, 300] = -0.4
    x[3] = 0
    x[4, :256] = 0.01  # a constant positive super-block
    return x


# ---------------------------------------------------------------------------------------------
# A scalar port of the reference (test-only)


def _nearest(v) -> int:
    return int(np.rint(F(v)))


def _seqsum(a: np.ndarray) -> F:
    return F(np.cumsum(a.astype(F), dtype=F)[-1])


def _ref_qkx2(x, w, nmax, rmin, rdelta, nstep):
    lo, hi = F(min(x.min(), 0)), F(x.max())
    sum_w, sum_x = _seqsum(w), _seqsum(w * x)
    if hi == lo:
        return F(0), F(-lo), np.zeros(len(x), np.int64)
    iscale = F(F(nmax) / F(hi - lo))
    scale = F(F(1) / iscale)
    q = np.clip([_nearest(iscale * F(v - lo)) for v in x], 0, nmax)
    best = _seqsum(w * np.square(F(scale) * q.astype(F) + lo - x))
    for step in range(nstep + 1):
        iscale = F(F(F(rmin) + F(rdelta) * F(step) + F(nmax)) / F(hi - lo))
        qa = np.clip([_nearest(iscale * F(v - lo)) for v in x], 0, nmax).astype(F)
        s_l, s_l2, s_xl = _seqsum(w * qa), _seqsum(w * qa * qa), _seqsum(w * qa * x)
        det = F(sum_w * s_l2 - s_l * s_l)
        if det > 0:
            this_s = F((sum_w * s_xl - sum_x * s_l) / det)
            this_m = F((s_l2 * sum_x - s_l * s_xl) / det)
            if this_m > 0:
                this_m, this_s = F(0), F(s_xl / s_l2)
            err = _seqsum(w * np.square(this_s * qa + this_m - x))
            if err < best:
                q, best, scale, lo = qa.astype(np.int64), err, this_s, this_m
    return scale, F(-lo), q


def _ref_q45k_block(x, nmax, rmin, rdelta, nstep):
    scales, mins, codes = np.zeros(8, F), np.zeros(8, F), np.zeros(256, np.int64)
    for j in range(8):
        sub = x[32 * j:32 * j + 32]
        av = F(np.sqrt(F(_seqsum(sub * sub) / F(32))))
        scales[j], mins[j], codes[32 * j:32 * j + 32] = _ref_qkx2(sub, av + np.abs(sub), nmax, rmin, rdelta, nstep)
    max_s, max_m = max(F(0), scales.max()), max(F(0), mins.max())
    inv_s = F(63) / max_s if max_s > 0 else F(0)
    inv_m = F(63) / max_m if max_m > 0 else F(0)
    ls = [min(63, _nearest(inv_s * s)) for s in scales]
    lm = [min(63, _nearest(inv_m * m)) for m in mins]
    d, dmin = np.float16(max_s / F(63)), np.float16(max_m / F(63))
    for j in range(8):
        step = F(F(d) * F(ls[j]))
        if step == 0:
            continue
        shift = F(F(dmin) * F(lm[j]))
        for i in range(32 * j, 32 * j + 32):
            codes[i] = min(nmax, max(0, _nearest(F(x[i] + shift) / step)))
    return d, dmin, ls, lm, codes


def _ref_decode_q45k(x_blocks, nmax, rmin, rdelta, nstep):
    """Reference codes decoded straight to floats (so no packing code is shared with the library)."""
    out = []
    for x in x_blocks:
        d, dmin, ls, lm, codes = _ref_q45k_block(x, nmax, rmin, rdelta, nstep)
        step = np.repeat(F(d) * np.array(ls, F), 32)
        shift = np.repeat(F(dmin) * np.array(lm, F), 32)
        out.append(step * codes.astype(F) - shift)
    return np.stack(out)


def _ref_qx(x, nmax):
    amax_i = int(np.argmax(np.abs(x)))
    peak = F(x[amax_i])
    if abs(peak) < 1e-15:
        return F(0), np.zeros(len(x), np.int64)
    w = x * x

    def attempt(numer):
        iscale = F(F(-numer) / peak)
        q = np.clip([_nearest(iscale * v) for v in x], -nmax, nmax - 1).astype(F)
        return q, _seqsum(w * x * q), _seqsum(w * q * q)

    q, slx, sl2 = attempt(F(nmax))
    scale = F(slx / sl2) if sl2 else F(0)
    best = F(scale * slx)
    for k in range(-9, 10):
        if k == 0:
            continue
        qa, slx, sl2 = attempt(F(F(nmax) + F(0.1) * F(k)))
        if sl2 > 0 and F(slx * slx) > F(best * sl2):
            q, scale = qa, F(slx / sl2)
            best = F(scale * slx)
    return scale, q.astype(np.int64) + nmax


def _ref_decode_q6k(x_blocks):
    out = []
    for x in x_blocks:
        scales, codes = np.zeros(16, F), np.zeros(256, np.int64)
        for j in range(16):
            scales[j], codes[16 * j:16 * j + 16] = _ref_qx(x[16 * j:16 * j + 16], 32)
        pick = int(np.argmax(np.abs(scales)))
        if abs(scales[pick]) < 1e-15:
            out.append(np.zeros(256, F))
            continue
        iscale = F(F(-128) / scales[pick])
        d = np.float16(F(1) / iscale)
        sc = [min(127, _nearest(iscale * s)) for s in scales]
        y = np.zeros(256, F)
        for j in range(16):
            step = F(F(d) * F(sc[j]))
            for i in range(16 * j, 16 * j + 16):
                code = codes[i] if step == 0 else min(31, max(-32, _nearest(x[i] / step))) + 32
                y[i] = step * F(code - 32)
        out.append(y)
    return np.stack(out)


REFERENCE = {
    "Q4_K": lambda b: _ref_decode_q45k(b, 15, -1.0, 0.1, 20),
    "Q5_K": lambda b: _ref_decode_q45k(b, 31, -0.5, 0.1, 15),
    "Q6_K": _ref_decode_q6k,
}


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("qtype", KTYPES)
def test_blocks_decode_with_gguf_to_the_shape_and_size_of_the_format(qtype):
    x = _weights_like_llm(8, 512)
    q = quantize_k(x, qtype)
    assert q.dtype == np.uint8 and q.shape == (8, 2 * BYTES_PER_BLOCK[qtype])
    y = dequantize(q, gguf.GGMLQuantizationType[qtype])
    assert y.shape == x.shape and np.isfinite(y).all()
    assert np.all(y[3] == 0), "an all-zero row must decode to exact zeros"


@pytest.mark.parametrize("qtype", KTYPES)
def test_error_is_within_half_a_step_except_where_codes_clamp(qtype):
    """Round to nearest against the stored scale: |x - y| <= step/2 unless x lies beyond the grid."""
    x = _weights_like_llm(16, 1024, seed=1)
    y = dequantize(quantize_k(x, qtype), gguf.GGMLQuantizationType[qtype])
    sub = 16 if qtype == "Q6_K" else 32
    xs, ys = x.reshape(-1, sub), y.reshape(-1, sub)
    levels = {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[qtype]
    # the decoded grid of each sub-block is y_min + k*step; its step follows from the decoded extremes
    step = np.zeros(len(ys), F)
    for i, row in enumerate(ys):
        u = np.unique(row)
        if len(u) > 1:
            step[i] = np.min(np.diff(u))
    inside = (xs >= ys.min(1, keepdims=True)) & (xs <= ys.max(1, keepdims=True))
    assert step.max() > 0
    bound = step[:, None] / 2 * (1 + 1e-3) + 1e-7
    assert np.all(np.abs(xs - ys)[inside] <= np.broadcast_to(bound, xs.shape)[inside])
    rel_rmse = np.sqrt(np.mean((y - x) ** 2)) / x.std()
    assert rel_rmse < {"Q4_K": 0.09, "Q5_K": 0.045, "Q6_K": 0.022}[qtype], (qtype, rel_rmse, levels)


def _same_optimum(ours: np.ndarray, ref: np.ndarray) -> None:
    """Never worse than the reference's pick (beyond rounding), and equal to it for nearly every group."""
    worse = ours > ref * (1 + 1e-4) + 1e-20
    assert not worse.any(), (np.flatnonzero(worse), (ours / ref)[worse])
    assert np.mean(np.isclose(ours, ref, rtol=1e-4, atol=0)) >= 0.95


def _groups(n: int, size: int) -> np.ndarray:
    return _weights_like_llm(8, 1024, seed=3).reshape(-1, size)[:n]


def test_asymmetric_search_finds_the_reference_optimum():
    """Per 32-group (Q4_K/Q5_K's make_qkx2_quants): the same weighted error as the reference's pick.

    Codes can differ where two candidate scales give errors equal to float rounding (the reference sums
    residuals one by one, we use moments), and then only on near-zero weights: the error is what must match.
    """
    import torch

    from leantune.export.gguf.kquant_search import asymmetric_search

    x = _groups(48, 32)
    w = (np.sqrt(np.mean(x * x, 1, keepdims=True)) + np.abs(x)).astype(F)
    for nmax, rmin, rdelta, nstep in [(15, -1.0, 0.1, 20), (31, -0.5, 0.1, 15)]:
        scale, mn, q = (t.numpy() for t in asymmetric_search(torch.tensor(x), torch.tensor(w), nmax, rmin, rdelta, nstep))
        ours = np.sum(w * (scale[:, None] * q - mn[:, None] - x) ** 2, 1)
        ref = []
        for xi, wi in zip(x, w):
            s, m, qi = _ref_qkx2(xi, wi, nmax, rmin, rdelta, nstep)
            ref.append(np.sum(wi * (s * qi - m - xi) ** 2))
        _same_optimum(ours, np.array(ref))


def test_symmetric_search_finds_the_reference_optimum():
    """Per 16-group (Q6_K's make_qx_quants, weights x^2): the same weighted error as the reference's pick."""
    import torch

    from leantune.export.gguf.kquant_search import symmetric_search

    x = _groups(48, 16)
    scale, q = (t.numpy() for t in symmetric_search(torch.tensor(x), 32))
    ours = np.sum(x * x * (scale[:, None] * (q - 32) - x) ** 2, 1)
    ref = []
    for xi in x:
        s, qi = _ref_qx(xi, 32)
        ref.append(np.sum(xi * xi * (s * (qi - 32) - xi) ** 2))
    _same_optimum(ours, np.array(ref))


@pytest.mark.parametrize("qtype", KTYPES)
def test_whole_blocks_match_the_reference_quantizer(qtype):
    """Whole super-blocks through the reference (6-bit scales, fp16 d, re-rounding): the same RMSE to 0.5%,
    and most blocks bit-identical once decoded (a near-tie in one sub-block moves d for its whole block)."""
    x = _weights_like_llm(5, 512, seed=2).reshape(-1, 256)
    ours = dequantize(quantize_k(x, qtype), gguf.GGMLQuantizationType[qtype])
    ref = REFERENCE[qtype](x)
    same_blocks = np.mean(np.all(ours == ref, axis=1))
    assert same_blocks >= 0.4, same_blocks
    rmse_ours, rmse_ref = np.sqrt(np.mean((ours - x) ** 2)), np.sqrt(np.mean((ref - x) ** 2))
    assert abs(rmse_ours - rmse_ref) <= 0.005 * rmse_ref


def test_rows_not_a_multiple_of_256_are_refused():
    with pytest.raises(ValueError, match="multiple of 256"):
        quantize_k(np.zeros((2, 576), F), "Q4_K")
