"""Quantized frozen base layers (QLoRA's NF4/FP4 and LLM.int8) through bitsandbytes, the loader that
fills a model with them tensor by tensor, and the quant settings (`spec.py`). Of leantune it imports
only the foundation (errors, device, io)."""

from .layers import (
    dequantize,
    is_quantized,
    load_prequantized,
    new_quant_linear,
    quantize_weight,
    spec_of,
    storage_bits,
)
from .loader import fill_from_safetensors, norm_outputs_in, params_on_meta, quantizable_linears, swap_in_quant_linears
from .spec import QuantSpec, require_bitsandbytes

__all__ = [
    "QuantSpec", "dequantize", "fill_from_safetensors", "is_quantized", "load_prequantized", "new_quant_linear",
    "norm_outputs_in", "params_on_meta", "quantizable_linears", "quantize_weight", "require_bitsandbytes", "spec_of", "storage_bits",
    "swap_in_quant_linears",
]
