"""LoftQ initialisation of LoRA over a 4-bit base (`lora.init: loftq`).

LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659) starts each adapter at the best rank-r
approximation of what quantization took from its weight, so base + adapter begins near the 16-bit model
instead of near the 4-bit one. This is the one-step form PEFT ships as `replace_lora_weights_loftq`: the
base stays the standard NF4/FP4 quantization of W (any bitsandbytes base loads it; the adapter file is a
plain LoRA), and only A and B change:

    R = W - dequant(Q(W))                  the quantization residual, fp32
    U, S, V^T = svd(R)                     truncated to the adapter's rank r
    B = U_r sqrt(S_r / s),  A = sqrt(S_r / s) V_r^T,   so that  s * B @ A = U_r S_r V_r^T

with s the adapter's scaling (alpha / r, or alpha / sqrt(r) with rsLoRA). PEFT leaves the 1/s out (its
B @ A alone equals the truncated residual, so with lora_alpha != r its start is s times it); with
alpha == r both give the same numbers (tests/parity/test_loftq.py).

The float weights come from the model folder's safetensors, read one tensor at a time, so the 16-bit model
is never held whole. What it bought is measured and returned: the relative Frobenius error
||W - W_effective|| / ||W|| of the quantized weights before and after, averaged over the layers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..adapters.base import adapter_modules
from ..adapters.lora import LoraLinear
from ..errors import ModelError
from ..io.tensor_file import tensor_index
from ..quant import dequantize

log = logging.getLogger(__name__)


def residual_factors(weight: torch.Tensor, dequantized: torch.Tensor, rank: int,
                     scaling: float) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(A, B, error before, error after) for one layer; A is (r, in), B is (out, r), errors relative."""
    w = weight.to(torch.float32)
    residual = w - dequantized.to(device=w.device, dtype=torch.float32)
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    root = torch.sqrt(s[:rank] / scaling)
    b = u[:, :rank] * root                                  # (out, r)
    a = root[:, None] * vh[:rank]                           # (r, in)
    norm = torch.linalg.matrix_norm(w)
    before = float(torch.linalg.matrix_norm(residual) / norm)
    after = float(torch.linalg.matrix_norm(residual - scaling * (b @ a)) / norm)
    return a, b, before, after


def _float_weights(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"lora.init loftq reads the 16-bit weights from {str(folder)!r}, which has no .safetensors "
                         "files; point model at the unquantized HF folder")
    return tensor_index(files)


def loftq_init_(model: nn.Module, model_dir: str | Path) -> dict:
    """Set A and B of every LoRA adapter over a 4-bit layer of `model` from the weights in `model_dir`."""
    index = _float_weights(Path(model_dir))
    before, after = [], []
    for path, adapter in adapter_modules(model).items():
        if type(adapter) is not LoraLinear:
            continue
        base = adapter.base_layer
        if type(base.weight).__name__ != "Params4bit":  # LoftQ here is for NF4/FP4 bases
            continue
        key = f"{path}.weight"
        if key not in index:
            raise ModelError(f"lora.init loftq: {str(model_dir)!r} has no float tensor {key!r} (it may be a quantized "
                             "checkpoint); point model at the unquantized HF folder the 4-bit base was made from")
        if not index[key].dtype(key).is_floating_point:
            raise ModelError(f"lora.init loftq: {key} in {str(model_dir)!r} is already quantized; LoftQ needs the "
                             "16-bit weights the 4-bit base was made from")
        w = index[key].get(key).to(base.weight.device)
        a, b, e0, e1 = residual_factors(w, dequantize(base), adapter.rank, adapter.scaling)
        with torch.no_grad():
            adapter.lora_A.weight.copy_(a.to(adapter.lora_A.weight.dtype))
            adapter.lora_B.weight.copy_(b.to(adapter.lora_B.weight.dtype))
        before.append(e0)
        after.append(e1)
    done = len(before)
    if done == 0:
        raise ModelError("lora.init loftq found no LoRA adapter over a 4-bit layer; it needs quant.bits 4")
    stats = {"layers": done, "error_before": sum(before) / done, "error_after": sum(after) / done}
    log.info("loftq: %d layers, relative weight error %.4f -> %.4f", done, stats["error_before"], stats["error_after"])
    return stats
