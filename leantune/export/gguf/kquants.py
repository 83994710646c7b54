"""k-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) in vectorised torch, byte for byte in llama.cpp's block layout.

The `gguf` package reads every GGML type but writes none of the k-quants, so the quantizers live here.
Each one follows ggml-quants.c: without an importance matrix the reference quantizer
(`quantize_row_q*_K_ref`), with one the weighted quantizer llama-quantize runs for `--imatrix`
(`quantize_row_q*_K_impl`), including their searches for the best scale; the loops over blocks become
tensor ops over all blocks at once (the few per-element refinement loops run over the 16 elements of a
group, vectorised over all groups).

Importance weights (imatrix.py): qw_i = mean over calibration tokens of x_i^2, the squared input of
column i. ggml weighs each value's squared error by qw_i * sqrt(sigma^2 + w_i^2) (sigma^2: the mean
square of the super-block, Q2_K: half of it), Q6_K by qw_i alone; the 6-bit (4-bit) sub-block scales
and mins are then fitted to the sub-block scales weighted by each sub-block's summed weight
(make_qp_quants / make_qx_quants) instead of max-scaled.

A super-block holds QK_K = 256 weights.
  Q2_K:        16 sub-blocks of 16, asymmetric: x ~ d*sc_j * q - dmin*m_j, q in [0, 3]; sc_j, m_j 4-bit
               (one byte per sub-block); d, dmin fp16.                    2.625 bits per weight.
  Q3_K:        16 sub-blocks of 16, symmetric: x ~ d*(sc_j - 32) * (q - 4), q in [0, 7]: 2 low bits in qs,
               the high bit in hmask; sc_j 6-bit, packed into 12 bytes; d fp16.  3.4375 bits per weight.
  Q4_K / Q5_K: 8 sub-blocks of 32, asymmetric: x ~ d*sc_j * q - dmin*m_j, q in [0, 15] / [0, 31];
               sc_j, m_j are 6-bit, packed into 12 bytes; d, dmin fp16.   4.5 / 5.5 bits per weight.
  Q6_K:        16 sub-blocks of 16, symmetric: x ~ d*sc_j * (q - 32), q in [0, 63]; sc_j int8, d fp16.
                                                                          6.5625 bits per weight.
Byte order per block (what gguf.quants' dequantizers expect):
  Q2_K  scales[16] | qs[64] | d | dmin               (84 bytes)
  Q3_K  hmask[32] | qs[64] | scales[12] | d          (110 bytes)
  Q4_K  d | dmin | scales[12] | qs[128]              (144 bytes)
  Q5_K  d | dmin | scales[12] | qh[32] | qs[128]     (176 bytes)
  Q6_K  ql[128] | qh[64] | scales[16] | d            (210 bytes)
Reference: https://github.com/ggml-org/llama.cpp/blob/master/ggml/src/ggml-quants.c
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .kquant_search import _round, asymmetric_search, q3_search, qp_search, symmetric_search

QK_K = 256
CHUNK_BLOCKS = 4096  # super-blocks per pass: ~1M floats, a few MB per temporary, cache friendly


def _f16(x: Tensor) -> Tensor:
    """The value after a trip through fp16, as ggml stores block scales (round to nearest even)."""
    return x.to(torch.float16).to(torch.float32)


def _f16_bytes(x: Tensor) -> Tensor:  # (N,) -> (N, 2) uint8, little endian
    return x.to(torch.float16).contiguous().view(torch.uint8).view(-1, 2)



def _importance(x: Tensor, qw: Tensor, sigma_scale: float) -> Tensor:
    """ggml's per-value weight under an imatrix: qw_i * sqrt(sigma^2 + x_i^2), sigma^2 = scale*mean(x^2)
    over the super-block. x, qw: (N, 256)."""
    sigma2 = sigma_scale * x.square().sum(1, keepdim=True) / QK_K
    return qw * (sigma2 + x * x).sqrt()


def _pack_2bit(q: Tensor) -> Tensor:
    """256 codes in [0, 3] -> 64 bytes: byte 32h + l holds codes 128h + l + 32k at bits 2k. (N, 256) -> (N, 64)."""
    shift = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    return (q.to(torch.uint8).view(-1, 2, 4, 32) << shift).sum(2, dtype=torch.uint8).reshape(-1, 64)


# ---------------------------------------------------------------------------------------------
# Q2_K


def _q2_k_blocks(x: Tensor, qw: Tensor | None = None) -> Tensor:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)  # (N*16, 16)
    if qw is None:  # quantize_row_q2_K_ref: weights |x|, absolute error, scales max-scaled to 4 bits
        scales, mins, q = asymmetric_search(sub, sub.abs(), 3, -0.5, 0.1, 15, mad=True)
        scales, mins = scales.view(n, 16), mins.view(n, 16)
        max_scale, max_min = scales.amax(1).clamp(min=0), mins.amax(1).clamp(min=0)
        inv_s = torch.where(max_scale > 0, 15 / torch.where(max_scale > 0, max_scale, 1), 0)
        inv_m = torch.where(max_min > 0, 15 / torch.where(max_min > 0, max_min, 1), 0)
        ls = _round(inv_s[:, None] * scales).clamp(0, 15)
        lm = _round(inv_m[:, None] * mins).clamp(0, 15)
        d, dmin = max_scale / 15, max_min / 15
    else:  # quantize_row_q2_K_impl
        w = _importance(x, qw, 1.0)
        scales, mins, q = asymmetric_search(sub, w.reshape(n * 16, 16), 3, -0.9, 0.05, 36)
        sw = w.view(n, 16, 16).sum(2)
        d, ls = qp_search(scales.view(n, 16), 15, sw)
        dmin, lm = qp_search(mins.view(n, 16), 15, sw)
    step = (_f16(d)[:, None] * ls).view(n, 16, 1)
    shift = (_f16(dmin)[:, None] * lm).view(n, 16, 1)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    fresh = _round((x.view(n, 16, 16) + shift) / safe).clamp_(0, 3)
    q = torch.where(step == 0, q.view(n, 16, 16), fresh).view(n, 256)
    sc = (ls.to(torch.uint8) | (lm.to(torch.uint8) << 4))
    return torch.cat([sc, _pack_2bit(q), _f16_bytes(d), _f16_bytes(dmin)], 1)


# ---------------------------------------------------------------------------------------------
# Q3_K


def _q3_k_blocks(x: Tensor, qw: Tensor | None = None) -> Tensor:
    n = x.shape[0]
    sub = x.reshape(n * 16, 16)
    if qw is None:  # quantize_row_q3_K_ref
        scales, q = q3_search(sub, 4)
        scales = scales.view(n, 16)
        max_scale = scales.gather(1, scales.abs().argmax(1, keepdim=True)).squeeze(1)  # signed, first max
        nz = max_scale != 0
        iscale = -32 / torch.where(nz, max_scale, torch.ones_like(max_scale))
        ls = _round(iscale[:, None] * scales).clamp(-32, 31) + 32
        ls = torch.where(nz[:, None], ls, torch.zeros_like(ls))
        d = torch.where(nz, 1 / iscale, torch.zeros_like(iscale))
    else:  # quantize_row_q3_K_impl
        w = _importance(x, qw, 2.0)
        scales, q = symmetric_search(sub, 4, w.reshape(n * 16, 16))
        d, ls = symmetric_search(scales.view(n, 16), 32, w.view(n, 16, 16).sum(2))
    step = (_f16(d)[:, None] * (ls - 32)).view(n, 16, 1)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    fresh = _round(x.view(n, 16, 16) / safe).clamp_(-4, 3) + 4
    q = torch.where(step == 0, q.view(n, 16, 16), fresh).to(torch.uint8).view(n, 256)
    bit = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    hmask = ((q.view(n, 8, 32) >> 2) << bit).sum(1, dtype=torch.uint8)  # bit b of byte m: code 32b + m > 3
    ls = ls.to(torch.uint8)
    low = ls & 0xF
    scale_bytes = torch.cat([low[:, :8] | (low[:, 8:] << 4),  # sub-block j < 8 low nibble, j >= 8 high
                             ((ls.view(n, 4, 4) >> 4) << (2 * bit[:, :4])).sum(1, dtype=torch.uint8)], 1)
    return torch.cat([hmask, _pack_2bit(q & 3), scale_bytes, _f16_bytes(d)], 1)


# ---------------------------------------------------------------------------------------------
# Q4_K / Q5_K


def _pack_scales_6bit(ls: Tensor, lm: Tensor) -> Tensor:
    """8 six-bit scales and 8 six-bit mins -> 12 bytes (ggml's get_scale_min_k4 layout). (N, 8) -> (N, 12)."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    first = lo_s | ((hi_s >> 4) << 6)
    second = lo_m | ((hi_m >> 4) << 6)
    third = (hi_s & 0xF) | ((hi_m & 0xF) << 4)
    return torch.cat([first, second, third], 1)


def _k_scales_mins(x: Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, qw: Tensor | None = None):
    """Sub-block search, then 6-bit scales/mins relative to fp16 super-block d/dmin. x: (N, 256)."""
    n = x.shape[0]
    sub = x.reshape(n * 8, 32)  # (N*8, 32)
    if qw is not None:  # quantize_row_q{4,5}_K_impl: imatrix weights, scales and mins fitted by make_qp_quants
        w = _importance(x, qw, 2.0)
        scales, mins, q = asymmetric_search(sub, w.reshape(n * 8, 32), nmax, -0.9, 0.05, 36)
        sw = w.view(n, 8, 32).sum(2)
        d, ls = qp_search(scales.view(n, 8), 63, sw)
        dmin, lm = qp_search(mins.view(n, 8), 63, sw)
        return d, dmin, ls.clamp(max=63).to(torch.uint8), lm.clamp(max=63).to(torch.uint8), q.view(n, 256)
    weights = sub.square().mean(1, keepdim=True).sqrt() + sub.abs()
    scales, mins, q = asymmetric_search(sub, weights, nmax, rmin, rdelta, nstep)
    scales, mins = scales.view(n, 8), mins.view(n, 8)
    max_scale = scales.amax(1).clamp(min=0)
    max_min = mins.amax(1).clamp(min=0)
    inv_s = torch.where(max_scale > 0, 63 / torch.where(max_scale > 0, max_scale, 1), 0)
    inv_m = torch.where(max_min > 0, 63 / torch.where(max_min > 0, max_min, 1), 0)
    ls = _round(inv_s[:, None] * scales).clamp(0, 63).to(torch.uint8)
    lm = _round(inv_m[:, None] * mins).clamp(0, 63).to(torch.uint8)
    d, dmin = max_scale / 63, max_min / 63
    return d, dmin, ls, lm, q.view(n, 256)


def _k_requantize(x: Tensor, d: Tensor, dmin: Tensor, ls: Tensor, lm: Tensor, q: Tensor, nmax: int) -> Tensor:
    """Final codes against the stored (fp16, 6-bit) scales; sub-blocks whose scale is 0 keep the search's."""
    n = x.shape[0]
    step = (_f16(d)[:, None] * ls.float()).view(n, 8, 1)
    shift = (_f16(dmin)[:, None] * lm.float()).view(n, 8, 1)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    fresh = _round((x.view(n, 8, 32) + shift) / safe).clamp_(0, nmax)
    return torch.where(step == 0, q.view(n, 8, 32), fresh).view(n, 256).to(torch.uint8)


def _q4_k_blocks(x: Tensor, qw: Tensor | None = None) -> Tensor:
    d, dmin, ls, lm, q = _k_scales_mins(x, 15, -1.0, 0.1, 20, qw)
    q = _k_requantize(x, d, dmin, ls, lm, q, 15).view(-1, 4, 2, 32)  # (N, 64-chunk, half, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_6bit(ls, lm), qs], 1)


def _q5_k_blocks(x: Tensor, qw: Tensor | None = None) -> Tensor:
    d, dmin, ls, lm, q = _k_scales_mins(x, 31, -0.5, 0.1, 15, qw)
    q = _k_requantize(x, d, dmin, ls, lm, q, 31).view(-1, 4, 2, 32)  # (N, 64-chunk, half, 32)
    low = q & 0xF
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    bit = torch.arange(8, dtype=torch.uint8).view(1, 4, 2, 1)  # 5th bit of chunk c, half h -> bit 2c+h
    qh = ((q >> 4) << bit).sum(dim=(1, 2), dtype=torch.uint8)  # (N, 32); distinct bits, so sum == or
    return torch.cat([_f16_bytes(d), _f16_bytes(dmin), _pack_scales_6bit(ls, lm), qh, qs], 1)


# ---------------------------------------------------------------------------------------------
# Q6_K


def _q6_k_blocks(x: Tensor, qw: Tensor | None = None) -> Tensor:
    n = x.shape[0]
    # with an imatrix ggml weighs by qw alone here (quantize_row_q6_K_impl), not qw * sqrt(sigma^2 + x^2)
    scales, q = symmetric_search(x.reshape(n * 16, 16), 32, None if qw is None else qw.reshape(n * 16, 16))
    scales, q = scales.view(n, 16), q.view(n, 16, 16)
    pick = scales.abs().argmax(1, keepdim=True)
    max_scale = scales.gather(1, pick).squeeze(1)
    empty = max_scale.abs() < 1e-15
    iscale = -128 / torch.where(empty, torch.ones_like(max_scale), max_scale)
    d = torch.where(empty, torch.zeros_like(iscale), 1 / iscale)
    sc = _round(iscale[:, None] * scales).clamp(max=127)
    sc = torch.where(empty[:, None], torch.zeros_like(sc), sc)
    step = (_f16(d)[:, None] * sc).view(n, 16, 1)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    fresh = _round(x.view(n, 16, 16) / safe).clamp_(-32, 31) + 32
    q = torch.where(step == 0, q, fresh)
    q = torch.where(empty[:, None, None], torch.zeros_like(q), q).to(torch.uint8)
    q = q.view(n, 2, 4, 32)  # (N, 128-half, quarter, 32)
    low = q & 0xF
    ql = torch.cat([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], 2).reshape(n, 128)
    shift = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    qh = ((q >> 4) << shift).sum(2, dtype=torch.uint8).reshape(n, 64)
    sc_bytes = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql, qh, sc_bytes, _f16_bytes(d)], 1)


_BLOCK_FNS = {"Q2_K": _q2_k_blocks, "Q3_K": _q3_k_blocks, "Q4_K": _q4_k_blocks, "Q5_K": _q5_k_blocks,
              "Q6_K": _q6_k_blocks}
BYTES_PER_BLOCK = {"Q2_K": 84, "Q3_K": 110, "Q4_K": 144, "Q5_K": 176, "Q6_K": 210}


def quantize_k(data: np.ndarray | Tensor, qtype: str, imatrix: np.ndarray | Tensor | None = None) -> np.ndarray:
    """Quantize a float array whose last dimension is a multiple of 256 to `qtype` (Q2_K ... Q6_K).

    imatrix: one importance per column (data.shape[-1],), e.g. the mean squared input of a Linear
    (imatrix.py); None quantizes as llama-quantize does without --imatrix.

    Returns uint8 with shape (*data.shape[:-1], data.shape[-1] // 256 * bytes_per_block): the byte
    layout that gguf.GGUFWriter.add_tensor(..., raw_dtype=...) stores as is.
    """
    fn = _BLOCK_FNS[qtype]
    x = torch.as_tensor(data).to(torch.float32)
    if x.shape[-1] % QK_K:
        raise ValueError(f"{qtype} needs rows that are a multiple of {QK_K} values, got {x.shape[-1]}")
    blocks = x.reshape(-1, QK_K)
    qw = None
    if imatrix is not None:
        qw = torch.as_tensor(imatrix).to(torch.float32)
        if qw.shape != (x.shape[-1],):
            raise ValueError(f"imatrix has shape {tuple(qw.shape)}; {qtype} of rows of {x.shape[-1]} needs one value per column")
        qw = qw.view(1, -1, QK_K).expand(blocks.shape[0] // (x.shape[-1] // QK_K), -1, -1).reshape(-1, QK_K)
    out = torch.empty(blocks.shape[0], BYTES_PER_BLOCK[qtype], dtype=torch.uint8)
    # One intra-op thread: the searches are hundreds of small elementwise ops in sequence, where waking
    # torch's worker threads costs more than the work. Measured on a busy 2-core machine, a 576x1536
    # tensor: Q4_K 8.5 s -> 1.8 s, Q3_K 29.5 s -> 2.3 s, Q2_K 21.8 s -> 1.5 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
            part = slice(start, start + CHUNK_BLOCKS)
            out[part] = fn(blocks[part].contiguous(), None if qw is None else qw[part].contiguous())
    finally:
        torch.set_num_threads(threads)
    return out.numpy().reshape(*x.shape[:-1], x.shape[-1] // QK_K * BYTES_PER_BLOCK[qtype])
