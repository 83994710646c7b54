"""Is each GGUF type as good as its bits, and is each file type's mix llama-quantize's?

Written after SmolLM2-135M's benchmark showed Q5_K_M worse than Q4_K_M: the encoders order correctly
on data without structure (below), the mix matches llama-quantize's own logs; the anomaly came from the
benchmark's reference, which is itself a dequantized Q4_1 model (docs/export.md, "Quality").
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as T  # noqa: E402

from leantune.export.gguf.quant_mix import decode, encode, tensor_type  # noqa: E402


def _rel_rmse(x: np.ndarray, qtype) -> float:
    y = decode(encode(x, qtype), qtype).reshape(x.shape)
    return float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x ** 2)))


@pytest.mark.parametrize("dist", ["normal", "laplace"])
def test_each_extra_bit_about_halves_the_error(dist):
    rng = np.random.default_rng(0)
    x = getattr(rng, dist)(size=(32, 1024)).astype(np.float32) * 0.02
    ladder = [T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_0]
    err = [_rel_rmse(x, t) for t in ladder]
    for (a, ea), (b, eb) in zip(zip(ladder, err), zip(ladder[1:], err[1:])):
        # one bit more is 2x finer; Q8_0 is 1.9 bits above Q6_K
        assert 1.6 <= ea / eb <= (4.5 if b == T.Q8_0 else 2.6), (a.name, ea, b.name, eb)
    # a k-quant (256-value super-blocks, searched scales) beats the legacy type of its bits
    assert _rel_rmse(x, T.Q4_K) < _rel_rmse(x, T.Q4_1) < _rel_rmse(x, T.Q4_0)
    assert _rel_rmse(x, T.Q5_K) < _rel_rmse(x, T.Q5_1) < _rel_rmse(x, T.Q5_0)


def _llama_7b_counts(quant: str) -> Counter:
    """Types llama-quantize gives Llama-2-7B (32 layers, MHA, untied, 4096 wide, ffn 11008)."""
    shapes = {"attn_q": (4096, 4096), "attn_k": (4096, 4096), "attn_v": (4096, 4096),
              "attn_output": (4096, 4096), "ffn_gate": (11008, 4096), "ffn_up": (11008, 4096),
              "ffn_down": (4096, 11008)}
    counts = Counter()
    for name, shape in [("token_embd.weight", (32000, 4096)), ("output.weight", (32000, 4096))] + [
            (f"blk.{i}.{p}.weight", s) for i in range(32) for p, s in shapes.items()]:
        counts[tensor_type(name, shape, quant, 32, tied=False, gqa=1).name] += 1
    return counts


@pytest.mark.parametrize("quant, want", [
    # the tensor type counts llama.cpp's loader prints for llama-2-7b.<quant>.gguf (TheBloke/Llama-2-7B-GGUF
    # model card logs), F32 norms left out
    ("Q4_K_M", {"Q4_K": 193, "Q6_K": 33}),
    ("Q5_K_M", {"Q5_K": 193, "Q6_K": 33}),
    ("Q3_K_M", {"Q3_K": 129, "Q4_K": 92, "Q5_K": 4, "Q6_K": 1}),
    ("Q6_K", {"Q6_K": 226}),
])
def test_mix_of_a_llama_7b_layout_is_llama_quantizes(quant, want):
    assert dict(_llama_7b_counts(quant)) == want


def test_tied_embeddings_are_quantized_as_the_output():
    # llama.cpp: with no output.weight, token_embd takes the output's rule (Q6_K, Q8_0 when rows are not
    # a multiple of the file type's block)
    assert tensor_type("token_embd.weight", (32000, 2048), "Q4_K_M", 16, tied=True).name == "Q6_K"
    assert tensor_type("token_embd.weight", (32000, 2048), "Q4_K_M", 16, tied=False).name == "Q4_K"
    assert tensor_type("token_embd.weight", (32000, 2048), "Q8_0", 16, tied=True).name == "Q8_0"
    assert tensor_type("token_embd.weight", (49152, 576), "Q4_0", 30, tied=True).name == "Q8_0"
