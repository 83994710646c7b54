"""The INT8 layouts: how one Linear weight is quantized, stored and read back. Pure torch.

All three are per output channel (row) and symmetric, with no zero point: for a weight W (out, in)

    s_o = max_i |W_oi| / 127          q_oi = round(W_oi / s_o) in [-127, 127]          W'_oi = q_oi * s_o

W8A16 (compressed-tensors `pack-quantized`, 8 bits, strategy "channel"): the scale is stored in the
model's dtype and q is computed against that stored scale, so dequantizing what is on disk gives W'
exactly. q + 128 is packed four to an int32, element j of a word at bits 8j (compressed-tensors'
`pack_to_int32`: dense, LSB first, offset 2^(bits-1)). Tensors per Linear: `weight_packed` int32
(out, ceil(in/4)), `weight_scale` (out, 1), `weight_shape` int64 [out, in]. Scale = absmax / 127 rather than
llm-compressor's absmax / 127.5: the largest weight of each row is then stored exactly, never clipped.

W8A8 (compressed-tensors `int-quantized`, its preset "W8A8"): the same q and scale stored plainly, `weight`
int8 (out, in) and `weight_scale` (out, 1) in the model's dtype. The runtime also rounds every Linear's input
to int8, per token (row of x), dynamically and symmetrically: s_t = max_i |x_ti| / 127, x'_ti = round(x_ti / s_t)
* s_t; the product is then an int8 x int8 GEMM with int32 accumulation, rescaled by s_t * s_o (vLLM:
oneDNN on CPU, CUTLASS on GPU). `fake_quantize_per_token` is that input rounding in float, for our reference.

LLM.int8 (Dettmers et al. 2022, https://arxiv.org/abs/2208.07339), as bitsandbytes quantizes and
transformers serializes it: W is cast to fp16 first, then `SCB` = max|W16| per row (float32) and
`weight` = round(127 * W16 / SCB) (int8), plus `weight_format` (uint8 0: row-major). The outlier
decomposition (threshold 6.0) happens at inference on the activations; the stored weights are all int8.
"""

from __future__ import annotations

import torch

from ...quant.wna16 import pack_rows, unpack_rows

PACK = 4   # int8 values per int32 word


def w8a16_quantize(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (out, in), scale (out, 1) in `scale_dtype`) for a float weight (out, in)."""
    w = w.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).to(scale_dtype)   # (out, 1)
    safe = scale.float().clamp_min(torch.finfo(torch.float32).tiny)      # an all-zero row: q = 0
    q = torch.round(w / safe).clamp_(-127, 127).to(torch.int8)
    return q, scale


def pack_int8(q: torch.Tensor) -> torch.Tensor:
    """int8 (out, in) -> int32 (out, ceil(in/4)): value + 128, element j of a word at bits 8j (the 4/8-bit
    packer of quant/wna16.py, the columns padded to whole words)."""
    u = torch.nn.functional.pad(q.to(torch.int64) + 128, (0, -q.shape[1] % PACK))   # pad words hold 0
    return pack_rows(u, 8)


def unpack_int8(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The inverse of `pack_int8`: int32 (out, k) -> int8 (out, in)."""
    return (unpack_rows(packed, 8)[:, :shape[1]] - 128).to(torch.int8)


def w8a16_tensors(w: torch.Tensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    q, scale = w8a16_quantize(w, scale_dtype)
    return {"weight_packed": pack_int8(q), "weight_scale": scale,
            "weight_shape": torch.tensor(list(w.shape), dtype=torch.int64)}


def w8a16_weight(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight the stored W8A16 tensors of one Linear stand for."""
    shape = tuple(int(x) for x in t["weight_shape"])
    return unpack_int8(t["weight_packed"], shape).float() * t["weight_scale"].float()


def w8a8_tensors(w: torch.Tensor, scale_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    q, scale = w8a16_quantize(w, scale_dtype)
    return {"weight": q, "weight_scale": scale}


def w8a8_weight(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight the stored W8A8 tensors of one Linear stand for."""
    return t["weight"].float() * t["weight_scale"].float()


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """x (..., in) rounded to int8 per token (last dim), symmetric, and back: what W8A8's runtime feeds its GEMM."""
    scale = x.abs().amax(dim=-1, keepdim=True).float() / 127                     # (..., 1)
    safe = scale.clamp_min(torch.finfo(torch.float32).tiny)                      # an all-zero token stays 0
    return (torch.round(x.float() / safe).clamp_(-127, 127) * scale).to(x.dtype)


def llm_int8_tensors(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """bitsandbytes' own row-wise quantization of the fp16 weight: what transformers would save."""
    import bitsandbytes.functional as bnbf

    q, scb, _ = bnbf.int8_vectorwise_quant(w.to(torch.float16).contiguous())
    return {"weight": q.contiguous(), "SCB": scb.float().contiguous(), "weight_format": torch.tensor(0, dtype=torch.uint8)}


def llm_int8_weight(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float32 weight bitsandbytes dequantizes the stored int8 and SCB to."""
    return t["weight"].float() * t["SCB"].float()[:, None] / 127
