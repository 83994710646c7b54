"""Q2_K and Q3_K blocks against the gguf package's dequantizers, llama-quantize's Q2_K / Q3_K_S/M/L
tensor mixes, and the importance matrix's effect on the k-quant searches.

"Within half a quant step": every value decodes (through gguf.quants.dequantize, the reader's code) to
the grid point of its sub-block nearest to it, the grid being read from the block bytes here with the
layout of ggml's block_q2_K / block_q3_K, independently of the encoder.
"""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as T  # noqa: E402

from leantune.export.gguf.kquants import quantize_k  # noqa: E402
from leantune.export.gguf.quant_mix import tensor_type  # noqa: E402


def _weights(rows: int = 48, cols: int = 512, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
    x[1] *= 30                                   # a row with large values
    x[2, :256] = 0                               # an all-zero super-block
    x[3, 16:32] = 0.5                            # a flat sub-block
    x[4] = np.abs(x[4])                          # all positive: the min must stay at 0
    x[5, rng.integers(0, cols, 8)] = 0.4         # outliers
    return x


def _f16(b: np.ndarray) -> np.ndarray:
    return b.copy().view(np.float16).astype(np.float32)[:, 0]


def _grids(blocks: np.ndarray, qtype: str) -> np.ndarray:
    """(n_blocks, 16 sub-blocks, codes) of the values each sub-block can decode to."""
    if qtype == "Q2_K":
        sc, d, dmin = blocks[:, :16], _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
        step, shift = d[:, None] * (sc & 0xF), dmin[:, None] * (sc >> 4)
        return step[..., None] * np.arange(4) - shift[..., None]
    raw, d = blocks[:, 96:108], _f16(blocks[:, 108:110])
    low = np.concatenate([raw[:, :8] & 0xF, raw[:, :8] >> 4], 1)                     # sub-blocks 0-7, 8-15
    high = (raw[:, 8:12][:, None, :] >> (2 * np.arange(4))[None, :, None]) & 3       # (n, j // 4, j % 4)
    sc = (low | (high.reshape(-1, 16) << 4)).astype(np.int32) - 32
    return (d[:, None] * sc)[..., None] * (np.arange(8) - 4)


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K"])
@pytest.mark.parametrize("weighted", [False, True])
def test_blocks_decode_with_gguf_to_the_nearest_grid_point(qtype, weighted):
    x = _weights()
    imatrix = np.random.default_rng(1).random(x.shape[1]).astype(np.float32) if weighted else None
    stored = quantize_k(x, qtype, imatrix)
    size = {"Q2_K": 84, "Q3_K": 110}[qtype]
    assert stored.shape == (x.shape[0], x.shape[1] // 256 * size)
    back = gguf.quants.dequantize(stored, getattr(T, qtype)).reshape(x.shape)
    blocks = stored.reshape(-1, size)
    grid = _grids(blocks, qtype).astype(np.float32)                       # (n, 16, codes)
    values = x.reshape(-1, 16, 16)
    nearest = np.abs(values[..., None] - grid[:, :, None, :]).min(-1)     # distance to the nearest grid point
    got = np.abs(values - back.reshape(-1, 16, 16))
    scale = np.abs(grid).max(-1, keepdims=True) + 1e-12
    assert np.all(got <= nearest + 1e-5 * scale), float((got - nearest).max())
    # gguf decodes to points of our grid (the byte layout agrees), and zeros stay zeros
    on_grid = np.abs(back.reshape(-1, 16, 16)[..., None] - grid[:, :, None, :]).min(-1)
    assert np.all(on_grid <= 1e-6 * scale)
    assert np.all(back[2, :256] == 0)
    # and the fit is a fit: error well below the spread of the values
    err = np.sqrt(np.mean((back - x) ** 2))
    assert err < {"Q2_K": 0.45, "Q3_K": 0.25}[qtype] * np.sqrt(np.mean(x ** 2))


def test_imatrix_lowers_the_error_on_important_columns():
    """The imatrix weights the scale/min search: on the columns it marks important the error drops."""
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((64, 512)) * 0.02).astype(np.float32)
    imatrix = np.full(512, 0.01, dtype=np.float32)
    important = rng.choice(512, 64, replace=False)
    imatrix[important] = 10.0
    for qtype in ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"):
        qt = getattr(T, qtype)
        plain = gguf.quants.dequantize(quantize_k(x, qtype), qt).reshape(x.shape)
        weighted = gguf.quants.dequantize(quantize_k(x, qtype, imatrix), qt).reshape(x.shape)
        e_plain = np.mean((plain - x)[:, important] ** 2)
        e_weighted = np.mean((weighted - x)[:, important] ** 2)
        assert e_weighted < 0.85 * e_plain, (qtype, e_weighted / e_plain)
        # deterministic
        assert np.array_equal(quantize_k(x, qtype, imatrix), quantize_k(x, qtype, imatrix))


def test_imatrix_of_the_wrong_length_is_refused():
    with pytest.raises(ValueError, match="one value per column"):
        quantize_k(np.zeros((2, 256), np.float32), "Q4_K", np.ones(128, np.float32))


def _mix(quant: str, n_layers: int = 32, gqa: int = 1) -> dict[str, str]:
    names = ["token_embd.weight", "output.weight"] + [
        f"blk.{i}.{p}.weight" for i in range(n_layers)
        for p in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")]
    return {n: tensor_type(n, (1024, 1024), quant, n_layers, False, gqa).name for n in names}


def test_q2_k_and_q3_k_mixes_follow_llama_quantize():
    # src/llama-quant.cpp, llama_tensor_get_type_impl (dense model, no imatrix)
    m = _mix("Q2_K")
    assert m["output.weight"] == "Q6_K" and m["token_embd.weight"] == "Q2_K"
    assert {m[f"blk.{i}.attn_v.weight"] for i in range(32)} == {"Q3_K"}
    assert _mix("Q2_K", gqa=4)["blk.5.attn_v.weight"] == "Q4_K"
    assert m["blk.7.ffn_down.weight"] == "Q3_K" and m["blk.7.attn_output.weight"] == "Q3_K"
    assert m["blk.7.attn_q.weight"] == m["blk.7.ffn_up.weight"] == "Q2_K"

    s = _mix("Q3_K_S")
    assert s["output.weight"] == "Q6_K"
    assert {v for k, v in s.items() if k != "output.weight"} == {"Q3_K"}

    mm = _mix("Q3_K_M")
    assert [mm[f"blk.{i}.attn_v.weight"] for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert [mm[f"blk.{i}.ffn_down.weight"] for i in (0, 1, 2, 31)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert mm["blk.9.attn_output.weight"] == "Q4_K" and mm["blk.9.attn_k.weight"] == "Q3_K"

    lm = _mix("Q3_K_L")
    assert lm["blk.9.attn_v.weight"] == lm["blk.9.ffn_down.weight"] == lm["blk.9.attn_output.weight"] == "Q5_K"
    assert lm["blk.9.ffn_gate.weight"] == "Q3_K"


def test_q2_k_and_q3_k_fall_back_to_q4_0_on_rows_not_a_multiple_of_256():
    assert tensor_type("blk.3.attn_q.weight", (576, 576), "Q3_K_M", 30, True).name == "Q4_0"
    assert tensor_type("blk.3.attn_q.weight", (576, 576), "Q2_K", 30, True).name == "Q4_0"
    assert tensor_type("token_embd.weight", (49152, 576), "Q2_K", 30, True).name == "Q8_0"
