"""Device and dtype policy: which device to run on, and which dtype the frozen base weights get.

`resolve_device`: "auto" is a CUDA GPU when torch sees one, else the CPU; asking for CUDA without one
is an error naming what torch sees.

`pick_dtype`: "auto" is bf16 only where bf16 matmuls are fast (CUDA compute >= 8.0; CPUs with
avx512_bf16 or amx_bf16), else fp32. On a CPU without those flags torch emulates bf16 (measured on a
Cascade Lake Xeon without avx512_bf16: 40 GFLOPS bf16 vs 130 fp32). fp16 on CPU is slower still (a
576x1536 Linear: 5x fp32's time) and overflows where bf16 does not, so it is refused.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch

from .errors import ConfigError

_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
                "fp16": "float16", "float16": "float16", "half": "float16"}


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when torch sees a GPU, else cpu. "cuda"/"cuda:N" without a GPU is an error."""
    if isinstance(requested, torch.device):
        requested = str(requested)
    req = str(requested).strip().lower()
    if req == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(req)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu or cuda (or cuda:N), got {requested!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"device {requested!r} was asked for but torch sees no CUDA GPU (torch "
                              f"{torch.__version__}, {build}); use device: cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {requested!r}: torch sees only {torch.cuda.device_count()} GPU(s); "
                              f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ConfigError(f"device must be auto, cpu or cuda (or cuda:N), got {requested!r}")
    return device


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls in hardware (AVX512-BF16: Cooper Lake, Zen 4+; AMX: Sapphire Rapids+)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _cuda_has_fast_bf16(device: torch.device) -> bool:
    try:  # including_emulation=False: pre-Ampere GPUs "support" bf16 only by emulating it
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the argument
        return torch.cuda.get_device_capability(device)[0] >= 8


def pick_dtype(requested: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype for the frozen base weights: "auto" | "bf16" | "fp32" (or a torch.dtype)."""
    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if isinstance(requested, torch.dtype):
        return _allowed(requested, device, requested)
    name = str(requested).strip().lower()
    if name == "auto":
        fast = _cuda_has_fast_bf16(device) if device.type == "cuda" else cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    if name not in _DTYPE_NAMES:
        raise ConfigError(f"dtype must be auto, bf16 or fp32, got {requested!r}")
    dtype = _allowed(getattr(torch, _DTYPE_NAMES[name]), device, requested)
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        warnings.warn("bf16 on this CPU is emulated (no avx512_bf16/amx_bf16 flag): expect it to be ~3x "
                      "slower than fp32; dtype: auto picks fp32 here", stacklevel=2)
    return dtype


def _allowed(dtype: torch.dtype, device: torch.device, requested: object) -> torch.dtype:
    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ConfigError(f"dtype must be auto, bf16 or fp32, got {requested!r}")
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("fp16 is not supported on CPU (no fast fp16 matmul kernels: several times slower than "
                          "fp32, and it overflows where bf16 does not); use dtype: bf16 or fp32 (auto picks bf16 "
                          "where the CPU has avx512_bf16/amx_bf16)")
    return dtype
