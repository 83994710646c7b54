"""DoRA: Weight-Decomposed Low-Rank Adaptation (Liu et al. 2024, https://arxiv.org/abs/2402.09353).

The weight is split into a magnitude and a direction, and LoRA adapts the direction only:

    W' = m * (W + s * B @ A) / ||W + s * B @ A||_c        m: (out,), one norm per output row of W

m starts at ||W||_c, so with B = 0 the layer starts as the base. Following the paper (sec. 4.3) the norm
is treated as a constant in the backward pass (detached): it still tracks B @ A, but no gradient flows
through it, which saves the memory of its graph. The forward never forms W': with n = ||W + sBA||_c,

    y = base(x) + (m / n - 1) * (x @ W^T) + (m / n) * s * B(A(x))

which is PEFT 0.21.2's DoraLinearLayer (peft/tuners/lora/dora.py), kept exact to it, including the
dropout rule: when dropout is active, x @ W^T is recomputed on the dropped-out input. Merging folds W'
into the base: W <- (m / n) * (W + s * B @ A); unmerging divides by the same m / n, kept from the merge.
DoRA reads the `lora` config section (rank, alpha, dropout, targets, rslora, init).

With bf16/fp16 activations (a bf16 or quantized base) the products over x run in that dtype, A and B
cast per call, instead of PEFT's fp32 over upcast activations (see lora.py); the row norms are still
accumulated in fp32. The logits agree with PEFT's to bf16 resolution.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import adapter_dtype, dense_weight
from ..ops.lora import low_precision
from .lora import LoraLinear


def column_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """||W + delta||_c: the L2 norm of each output row of (out, in) weights -> (out,), in W's dtype."""
    return torch.linalg.norm(weight + delta, dim=1).to(weight.dtype)


class DoraLinear(LoraLinear, method="dora"):
    """LoRA on the direction of one nn.Linear's weight, plus a trainable magnitude per output feature."""

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "default") -> None:
        super().__init__(base_layer, rank, alpha, dropout, rslora, init)
        weight = dense_weight(base_layer)  # dequantized over a 4/8-bit base, as PEFT's DoRA does
        with torch.no_grad():  # PEFT: the norm in the base dtype, then kept as an fp32 parameter
            norm = column_norm(weight, self.delta_weight().to(weight.device))
        self.magnitude = nn.Parameter(norm.to(adapter_dtype(weight.dtype)))
        self.register_buffer("_merged_scale", None, persistent=False)  # m / n at merge time

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A.weight, self.lora_B.weight, self.magnitude]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        if low_precision(x.dtype) and not torch.is_autocast_enabled(x.device.type):
            return self._dora_in(x.dtype, x, result)
        out_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        weight = dense_weight(self.base_layer).to(x.dtype)
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_result = result - bias if bias is not None else result  # x @ W^T without the bias
        else:
            x = self.dropout(x)
            base_result = F.linear(x, weight)
        # B @ A formed through the layers, as PEFT forms it (one arithmetic, bit-equal logits):
        eye = torch.eye(self.lora_A.in_features, device=x.device, dtype=self.lora_A.weight.dtype)
        lora_weight = self.lora_B(self.lora_A(eye)).T.to(x.dtype)  # (out, in)
        # Detached, as the paper's sec. 4.3 asks: the norm follows B @ A but passes it no gradient.
        norm = column_norm(weight, self.scaling * lora_weight.detach()).detach()
        scale = (self.magnitude / norm).view(1, -1)  # (1, out): broadcasts over (..., out)
        lora_result = self.lora_B(self.lora_A(x))
        dora = (scale - 1) * base_result + scale * lora_result * self.scaling
        return (result + dora).to(out_dtype)

    def _dora_in(self, dtype: torch.dtype, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """The same update with bf16/fp16 activations: every product over x runs in `dtype`, A and B cast per
        call (as autocast would run PEFT's layer). Only weight-sized math is wider: the row norms are
        accumulated in fp32 from W + s B A formed in `dtype`, and m / n is formed in fp32, then rounded once."""
        a, b = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        weight = dense_weight(self.base_layer)  # (out, in): the base's own dtype, or dequantized to `dtype`
        if isinstance(self.dropout, nn.Identity) or not self.training:
            bias = self.base_layer.bias
            base_result = result - bias if bias is not None else result  # x @ W^T without the bias
        else:
            x = self.dropout(x)
            base_result = F.linear(x, weight.to(dtype))
        with torch.no_grad():  # detached, as the paper's sec. 4.3 asks
            direction = torch.addmm(weight.to(dtype), b, a, alpha=self.scaling)  # W + s B A: (out, in)
            norm = torch.linalg.vector_norm(direction, dim=1, dtype=torch.float32)  # (out,)
        scale = (self.magnitude / norm).to(dtype).view(1, -1)  # (1, out): broadcasts over (..., out)
        lora_result = F.linear(F.linear(x, a), b)
        dora = (scale - 1) * base_result + scale * lora_result * self.scaling
        return (result + dora).to(result.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        """W <- (m / n) * (W + s * B @ A), n taken from the unmerged weight (as the forward takes it)."""
        if self.merged:
            return
        weight = self._base_weight()
        delta = self.delta_weight().to(weight.device)
        self._merged_scale = (self.magnitude / column_norm(weight, delta)).view(-1, 1)  # (out, 1)
        weight.copy_(self._merged_scale * (weight + delta))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self._base_weight()
        weight.copy_(weight / self._merged_scale - self.delta_weight().to(weight.device))
        self._merged_scale = None
        self.merged = False

    def extra_repr(self) -> str:
        return super().extra_repr() + ", magnitude=(out,)"

