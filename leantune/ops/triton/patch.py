"""`train.kernels: triton`: put the Triton kernels into a loaded model and the chunked loss.

Duck-typed, no model code imported: an RMSNorm module of Llama's form (a `weight` and `variance_epsilon`, of a
class in `RMSNORMS`: Gemma's (1 + w) form is left alone) gets the fused RMSNorm; an MLP with gate_proj,
up_proj, down_proj and a SiLU activation gets the fused SwiGLU between its projections (which stay what they
are: LoRA-wrapped, 4-bit, ...); ops/cross_entropy.py takes the fused per-chunk loss.
"""

from __future__ import annotations

import types

from torch import nn

from .. import cross_entropy
from .cross_entropy import ce_rows
from .rmsnorm import rms_norm
from .swiglu import swiglu

RMSNORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm", "OlmoRMSNorm",
            "Olmo2RMSNorm", "GraniteRMSNorm"}


def _norm_forward(self, hidden_states):
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self, x):
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


def _silu(act) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def apply(model: nn.Module) -> dict[str, int]:
    """Swap the kernels in (forward methods of the instances, nothing else changes); returns what was swapped."""
    counts = {"rmsnorm": 0, "swiglu": 0}
    for module in model.modules():
        name = type(module).__name__
        if name in RMSNORMS and hasattr(module, "variance_epsilon"):
            module.forward = types.MethodType(_norm_forward, module)
            counts["rmsnorm"] += 1
        elif all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj")) and _silu(getattr(module, "act_fn", None)):
            module.forward = types.MethodType(_mlp_forward, module)
            counts["swiglu"] += 1
    cross_entropy.use_fused_rows(ce_rows)
    return counts


def remove() -> None:
    """The chunked loss back on torch ops (a model's patched forwards go with the model)."""
    cross_entropy.use_fused_rows(None)
