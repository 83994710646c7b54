"""Triton kernels for CUDA (`train.kernels: triton`): one kernel per module, each a torch.autograd.Function.

Triton is imported only inside these modules, and they are imported only when the switch asks for them, so
CPU paths never need it. With TRITON_INTERPRET=1 set before the first import, the same kernels run on CPU
tensors through Triton's interpreter (slow: the unit tests use it to check them against the plain torch math).

    cross_entropy  softmax + NLL + gradient of a logits chunk in one pass, written over the logits (Liger style)
    rmsnorm        RMSNorm with fp32 statistics, output in the input dtype
    swiglu         silu(gate) * up
    patch          swaps them into a loaded model (RMSNorm modules, SwiGLU MLPs) and the chunked loss

This package's __init__ imports no triton; `apply` loads `patch` (which does) by name, only when asked: the
one place leantune imports one of its modules at run time, because the module needs an optional package.

A fused LoRA kernel is not here: ops/lora.py already adds the update into the base output through addmm
(beta=1), saving x and the (N, r) product only, so a Triton version would fuse nothing torch does not.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

from ...errors import ConfigError


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") not in ("", "0")


def installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve(setting: str, device_type: str) -> str:
    """`train.kernels` -> "torch" or "triton" for a run on `device_type`.

    auto stays on torch everywhere: no GPU benchmark has yet shown a kernel pays (docs/benchmarks.md).
    triton needs the package and CUDA, or TRITON_INTERPRET=1 (CPU, for tests: very slow)."""
    if setting in ("auto", "torch"):
        return "torch"
    if not installed():
        raise ConfigError("train.kernels triton: the triton package is not installed; "
                            "install it (pip install triton) or set --train.kernels torch")
    if device_type != "cuda" and not interpreted():
        raise ConfigError(f"train.kernels triton needs a CUDA device (this run is on {device_type}); "
                            "set --train.kernels torch, or TRITON_INTERPRET=1 to run the kernels interpreted (slow)")
    return "triton"


def apply(model) -> dict[str, int]:
    """The kernels into `model` and the chunked loss (ops/triton/patch.py); returns what was swapped."""
    return importlib.import_module(f"{__name__}.patch").apply(model)
