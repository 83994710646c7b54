"""Quantized frozen base layers (QLoRA's NF4/FP4 and LLM.int8) through bitsandbytes, and the loader
that fills a model with them tensor by tensor. Imports only torch, safetensors and bitsandbytes."""

from .layers import (
    QuantSpec,
    dequantize,
    is_quantized,
    load_prequantized,
    new_quant_linear,
    quantize_weight,
    require_bitsandbytes,
    storage_bits,
)
from .loader import fill_from_safetensors, params_on_meta, quantizable_linears, swap_in_quant_linears

__all__ = [
    "QuantSpec", "dequantize", "fill_from_safetensors", "is_quantized", "load_prequantized", "new_quant_linear",
    "params_on_meta", "quantizable_linears", "quantize_weight", "require_bitsandbytes", "storage_bits",
    "swap_in_quant_linears",
]
