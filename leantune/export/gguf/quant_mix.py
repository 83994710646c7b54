"""Which GGML type each tensor gets for a requested --quant, and the bytes it is stored as.

The k-quant file types give a few sensitive tensors more bits, as llama.cpp's llama-quantize does
(`llama_tensor_get_type_impl` in src/llama-quant.cpp, dense models, no manual overrides):
  * output.weight (token_embd.weight when the embeddings are tied): Q6_K, or Q8_0 when its rows are
    not a multiple of the file type's block;
  * Q4_K_M / Q5_K_M: attn_v and ffn_down of the layers `use_more_bits` picks (the first and last
    eighth, and every third in between): Q6_K;
  * Q2_K: attn_v Q4_K when n_head / n_head_kv >= 4 else Q3_K; ffn_down and attn_output Q3_K;
  * Q3_K_S: Q3_K everywhere; Q3_K_M: attn_v of the first two layers Q5_K, of the others Q4_K; ffn_down
    Q5_K in the first sixteenth of the layers, Q4_K after; attn_output Q4_K;
    Q3_K_L: attn_v, ffn_down and attn_output Q5_K;
  * k-quants need rows that are a multiple of 256; otherwise Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
    Q5_K -> Q5_1, Q6_K -> Q8_0 (and F16 when even those do not fit). SmolLM2 (hidden 576) takes this
    path for most tensors.
With an importance matrix (imatrix.py) the k-quant tensors are encoded with its weights; the mix is
the same (llama.cpp changes it under an imatrix only for the IQ and Q4_0/Q5_0 types, which we do not write).
1-D tensors (norms, biases) stay F32 in every file type.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf import quants as gguf_quants

from ...errors import ConfigError
from .kquants import quantize_k

T = GGMLQuantizationType

# --quant -> (file type written as general.file_type, default tensor type)
FILE_TYPES: dict[str, tuple[LlamaFileType, GGMLQuantizationType]] = {
    "F32": (LlamaFileType.ALL_F32, T.F32),
    "F16": (LlamaFileType.MOSTLY_F16, T.F16),
    "BF16": (LlamaFileType.MOSTLY_BF16, T.BF16),
    "Q8_0": (LlamaFileType.MOSTLY_Q8_0, T.Q8_0),
    "Q4_0": (LlamaFileType.MOSTLY_Q4_0, T.Q4_0),
    "Q2_K": (LlamaFileType.MOSTLY_Q2_K, T.Q2_K),
    "Q3_K_S": (LlamaFileType.MOSTLY_Q3_K_S, T.Q3_K),
    "Q3_K_M": (LlamaFileType.MOSTLY_Q3_K_M, T.Q3_K),
    "Q3_K_L": (LlamaFileType.MOSTLY_Q3_K_L, T.Q3_K),
    "Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
    "Q5_K_M": (LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
    "Q6_K": (LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
}
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_K_TYPES = {T.Q2_K: "Q2_K", T.Q3_K: "Q3_K", T.Q4_K: "Q4_K", T.Q5_K: "Q5_K", T.Q6_K: "Q6_K"}
K_TYPES = frozenset(_K_TYPES)  # the types an importance matrix applies to


def check_quant(quant: str) -> str:
    q = quant.upper()
    if q not in FILE_TYPES:
        raise ConfigError(f"--quant {quant!r} is not supported; choose one of {', '.join(FILE_TYPES)}")
    return q


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's pick of layers that get more bits: first and last eighth, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layers: int, tied: bool, gqa: int = 1
                ) -> GGMLQuantizationType:
    """GGML type for tensor `name` (GGUF naming) of torch `shape` (out, in) under file type `quant`;
    gqa = n_head / n_head_kv."""
    base = FILE_TYPES[quant][1]
    if len(shape) < 2:
        return T.F32
    if base in (T.F32, T.F16, T.BF16):
        return base
    cols = shape[-1]
    new = base
    layer = int(name.split(".")[1]) if name.startswith("blk.") else 0
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        new = T.Q8_0 if cols % GGML_QUANT_SIZES[base][0] else (T.Q6_K if base != T.Q8_0 else base)
    elif ".attn_v." in name or ".attn_qkv." in name:  # llama.cpp's attn_v category holds fused qkv too
        new = {"Q2_K": T.Q4_K if gqa >= 4 else T.Q3_K, "Q3_K_M": T.Q5_K if layer < 2 else T.Q4_K,
               "Q3_K_L": T.Q5_K}.get(quant, new)
        if quant in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            new = T.Q6_K
    elif ".ffn_down." in name:
        new = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q5_K if layer < n_layers // 16 else T.Q4_K,
               "Q3_K_L": T.Q5_K}.get(quant, new)
        if quant in ("Q4_K_M", "Q5_K_M") and use_more_bits(layer, n_layers):
            new = T.Q6_K
    elif ".attn_output." in name:
        new = {"Q2_K": T.Q3_K, "Q3_K_M": T.Q4_K, "Q3_K_L": T.Q5_K}.get(quant, new)
    block = GGML_QUANT_SIZES[new][0]
    if cols % block:
        new = _FALLBACK.get(new, T.F16)
        if cols % GGML_QUANT_SIZES[new][0]:
            new = T.F16
    return new


def encode(data: np.ndarray, qtype: GGMLQuantizationType, imatrix: np.ndarray | None = None) -> np.ndarray:
    """float32 (rows, cols) -> what GGUFWriter stores for `qtype` (a float array or uint8 blocks).
    imatrix (cols,): importance weights for the k-quants; other types ignore it."""
    if qtype == T.F32:
        return data.astype(np.float32, copy=False)
    if qtype == T.F16:
        return data.astype(np.float16)
    if qtype in _K_TYPES:
        return quantize_k(data, _K_TYPES[qtype], imatrix)
    return gguf_quants.quantize(data.astype(np.float32, copy=False), qtype)


def decode(stored: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The float32 values a reader gets back from `stored` (gguf's own dequantizers)."""
    if qtype in (T.F32, T.F16):
        return stored.astype(np.float32)
    return gguf_quants.dequantize(stored, qtype)

