"""Which GGML type each tensor gets for a requested --quant, and the bytes it is stored as.

The _M ("mixed") file types give a few sensitive tensors more bits, as llama.cpp's llama-quantize does
(`llama_tensor_get_type` in src/llama-quant.cpp, no importance matrix):
  * output.weight (token_embd.weight when the embeddings are tied): Q6_K, or Q8_0 when its rows are
    not a multiple of 256;
  * Q4_K_M / Q5_K_M: attn_v and ffn_down of the layers `use_more_bits` picks (the first and last
    eighth, and every third in between): Q6_K;
  * k-quants need rows that are a multiple of 256; otherwise Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0
    (and F16 when even those do not fit). SmolLM2 (hidden 576) takes this path for most tensors.
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
    "Q4_K_M": (LlamaFileType.MOSTLY_Q4_K_M, T.Q4_K),
    "Q5_K_M": (LlamaFileType.MOSTLY_Q5_K_M, T.Q5_K),
    "Q6_K": (LlamaFileType.MOSTLY_Q6_K, T.Q6_K),
}
_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
_K_TYPES = {T.Q4_K: "Q4_K", T.Q5_K: "Q5_K", T.Q6_K: "Q6_K"}


def check_quant(quant: str) -> str:
    q = quant.upper()
    if q not in FILE_TYPES:
        raise ConfigError(f"--quant {quant!r} is not supported; choose one of {', '.join(FILE_TYPES)}")
    return q


def use_more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's pick of layers that get more bits: first and last eighth, and every third between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def tensor_type(name: str, shape: tuple[int, ...], quant: str, n_layers: int, tied: bool) -> GGMLQuantizationType:
    """GGML type for tensor `name` (GGUF naming) of torch `shape` (out, in) under file type `quant`."""
    base = FILE_TYPES[quant][1]
    if len(shape) < 2:
        return T.F32
    if base in (T.F32, T.F16, T.BF16):
        return base
    cols = shape[-1]
    new = base
    if name == "output.weight" or (tied and name == "token_embd.weight"):
        new = T.Q8_0 if cols % 256 else (T.Q6_K if base != T.Q8_0 else base)
    elif quant in ("Q4_K_M", "Q5_K_M") and (".attn_v." in name or ".ffn_down." in name):
        if use_more_bits(int(name.split(".")[1]), n_layers):
            new = T.Q6_K
    block = GGML_QUANT_SIZES[new][0]
    if cols % block:
        new = _FALLBACK.get(new, T.F16)
        if cols % GGML_QUANT_SIZES[new][0]:
            new = T.F16
    return new


def encode(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """float32 (rows, cols) -> what GGUFWriter stores for `qtype` (a float array or uint8 blocks)."""
    if qtype == T.F32:
        return data.astype(np.float32, copy=False)
    if qtype == T.F16:
        return data.astype(np.float16)
    if qtype in _K_TYPES:
        return quantize_k(data, _K_TYPES[qtype])
    return gguf_quants.quantize(data.astype(np.float32, copy=False), qtype)


def decode(stored: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """The float32 values a reader gets back from `stored` (gguf's own dequantizers)."""
    if qtype in (T.F32, T.F16):
        return stored.astype(np.float32)
    return gguf_quants.dequantize(stored, qtype)

