"""Quantized frozen Linear layers: 4-bit NF4/FP4 (QLoRA) and 8-bit LLM.int8, held by bitsandbytes.

4-bit (Dettmers et al. 2023, QLoRA, https://arxiv.org/abs/2305.14314). The weight is cut into blocks of
`blocksize` (64) values; each block keeps its absmax c and 4-bit indices into a 16-value code q
(NF4: quantiles of N(0, 1) scaled to [-1, 1]; FP4: a 4-bit float):

    W[i] ~= c_block(i) * q[idx[i]]                    4 bits per value + 32/64 for an fp32 absmax

Double quantization stores the absmaxes themselves in 8 bits, in blocks of 256 with one fp32 scale
(and one fp32 mean offset) each, so the cost per weight is 4 + 8/64 + 32/(64*256) ~= 4.127 bits.

8-bit (Dettmers et al. 2022, LLM.int8(), https://arxiv.org/abs/2208.07339): each output row keeps an
fp32 absmax s_r and int8 values, W[r, :] ~= s_r / 127 * int8[r, :]; activations with outliers above
`threshold` run in 16 bits.

The layers ARE bitsandbytes' own `Linear4bit` / `Linear8bitLt` (nn.Linear subclasses), built exactly as
transformers' `replace_with_bnb_linear` builds them. That keeps three things exact for free: their
state dict is transformers' bnb serialization (`weight`, `weight.absmax`, `weight.quant_map`,
`weight.nested_absmax`, `weight.nested_quant_map`, `weight.quant_state.bitsandbytes__nf4`; for 8-bit
`weight` + `SCB` + `weight_format`), PEFT's LoRA dispatch recognises them, and their forward is
bitsandbytes' kernel on every device it supports. What leantune adds is the small protocol around
them: build one, fill it from a float or a prequantized checkpoint tensor, dequantize it, count its bits.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import ModelError
from .spec import QuantSpec, require_bitsandbytes

_PARAM_CLASSES = ("Params4bit", "Int8Params")


def is_quantized(module: nn.Module) -> bool:
    """True for a Linear whose weight bitsandbytes holds quantized (duck-typed: no import needed)."""
    return type(getattr(module, "weight", None)).__name__ in _PARAM_CLASSES


def new_quant_linear(in_features: int, out_features: int, bias: bool, spec: QuantSpec) -> nn.Module:
    """An empty (meta-device) Linear4bit or Linear8bitLt, frozen, waiting for `quantize_weight`."""
    bnb = require_bitsandbytes(spec.bits)
    with torch.device("meta"):
        if spec.bits == 4:
            layer = bnb.nn.Linear4bit(in_features, out_features, bias, spec.compute_dtype,
                                      compress_statistics=spec.double_quant, quant_type=spec.type,
                                      quant_storage=torch.uint8)
            layer.weight.blocksize = spec.blocksize  # Linear4bit takes no blocksize argument; Params4bit reads it
        else:
            layer = bnb.nn.Linear8bitLt(in_features, out_features, bias, has_fp16_weights=False,
                                        threshold=spec.threshold)
    return layer.requires_grad_(False)


def quantize_weight(layer: nn.Module, weight: torch.Tensor, device: torch.device | str = "cpu") -> None:
    """Quantize a float (out, in) weight into `layer` on `device`. The float tensor is not kept."""
    import bitsandbytes as bnb

    if tuple(weight.shape) != (layer.out_features, layer.in_features):
        raise ModelError(f"a weight of shape {tuple(weight.shape)} does not fit a {layer.out_features}x"
                         f"{layer.in_features} Linear; the checkpoint does not match its config.json")
    old = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        new = bnb.nn.Params4bit(weight.contiguous(), requires_grad=False, blocksize=old.blocksize,
                                compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                quant_storage=old.quant_storage, module=layer)
        layer.weight = new._quantize(torch.device(device))
        if torch.device(device).type == "cpu" and layer.in_features % old.blocksize:
            _check_cpu_decode(layer)
    else:  # Int8Params quantizes on its first move to a real device
        layer.weight = bnb.nn.Int8Params(weight.to("cpu"), requires_grad=False, has_fp16_weights=False).to(device)


def codebook_decode(packed: torch.Tensor, state) -> torch.Tensor:
    """A 4-bit weight decoded from its format by hand, without bitsandbytes' kernel: two codes per byte
    (high nibble first), each code's value times its block's absmax (itself decoded when double-quantized)."""
    import bitsandbytes.functional as F

    absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset) if state.nested else state.absmax
    b = packed.flatten()
    codes = torch.stack([b >> 4, b & 15], 1).flatten().long()
    numel = state.shape.numel()
    scale = absmax.float().repeat_interleave(state.blocksize)[:numel]
    return (state.code.float()[codes][:numel] * scale).view(state.shape)


def _check_cpu_decode(layer: nn.Module) -> None:
    """bitsandbytes 0.50's CPU dequantize misplaces values for some shapes whose blocks cross row ends
    (measured: a 576x576 weight in blocks of 128 comes back with 2.4x the error, 96x96 in blocks of 64
    too; its quantization is right). Where blocks cross rows, decode the layer by hand once and refuse it
    if bitsandbytes disagrees: a silently damaged base would train, just worse."""
    packed, state = layer.weight.data, layer.weight.quant_state
    if not torch.allclose(dequantize(layer).float(), codebook_decode(packed, state), atol=1e-6, rtol=1e-5):
        raise ModelError(f"quant.blocksize {state.blocksize} does not divide this model's {layer.in_features}-wide "
                         "Linear rows, and bitsandbytes' CPU kernel decodes such blocks wrongly; use a "
                         f"quant.blocksize that divides {layer.in_features} (64 divides the rows of every common model)")


def load_prequantized(layer: nn.Module, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
    """Fill `layer` from its serialized tensors, keyed as in the state dict without the module prefix
    ("weight", "weight.absmax", ... for 4-bit; "weight", "SCB", "weight_format" for 8-bit)."""
    import bitsandbytes as bnb

    weight = tensors["weight"]
    if isinstance(layer, bnb.nn.Linear4bit):
        stats = {k.removeprefix("weight."): v for k, v in tensors.items() if k.startswith("weight.")}
        layer.weight = bnb.nn.Params4bit.from_prequantized(weight, stats, requires_grad=False,
                                                           device=torch.device(device), module=layer)
    else:
        if "SCB" not in tensors:
            raise ModelError("an 8-bit layer in the checkpoint has no SCB (row scales); re-save it with transformers")
        layer.weight = bnb.nn.Int8Params(weight.to(device), requires_grad=False, has_fp16_weights=False,
                                         SCB=tensors["SCB"].to(device)).to(device)


def dequantize(layer: nn.Module) -> torch.Tensor:
    """The (out, in) float weight the quantized layer multiplies by (fp32 for 8-bit)."""
    import bitsandbytes.functional as F

    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        data, state = weight.data, weight.quant_state
        if getattr(state, "packing_format_for_cpu", False):
            # bnb repacks weights for its CPU inference kernel on the first eval forward; undo that on a copy
            data, state = F._convert_weight_packed_for_cpu_inverse(data.clone(), copy.deepcopy(state))
        return F.dequantize_4bit(data, state)
    if type(weight).__name__ == "Int8Params":
        scb = weight.SCB if weight.SCB is not None else layer.state.SCB
        return F.int8_vectorwise_dequant(weight.data, scb)
    raise ModelError(f"{type(layer).__name__} is not a quantized layer; its weight is already {weight.dtype}")


def storage_bits(layer: nn.Module) -> tuple[int, int]:
    """(bits stored, weights represented) for a quantized layer: packed values + every statistic tensor
    (absmax, nested absmax and offset, the code tables), not counting the small JSON blob."""
    weight = layer.weight
    n = layer.in_features * layer.out_features
    bits = weight.data.numel() * weight.data.element_size() * 8
    if type(weight).__name__ == "Params4bit":
        state = weight.quant_state
        extras = [state.absmax, state.code]
        if state.nested:
            extras += [state.state2.absmax, state.state2.code, state.offset]
    else:
        scb = weight.SCB if weight.SCB is not None else layer.state.SCB
        extras = [scb]
    bits += sum(t.numel() * t.element_size() * 8 for t in extras if t is not None)
    return bits, n


def spec_of(model: nn.Module) -> QuantSpec | None:
    """The QuantSpec a model's quantized base was built with, read from its first quantized layer (the
    loader builds every one alike); None for a model without quantized layers."""
    layer = next((m for m in model.modules() if is_quantized(m)), None)
    if layer is None:
        return None
    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        return QuantSpec(bits=4, type=weight.quant_type, double_quant=bool(weight.compress_statistics),
                         compute_dtype=layer.compute_dtype, blocksize=weight.blocksize)
    return QuantSpec(bits=8, threshold=float(layer.state.threshold))
