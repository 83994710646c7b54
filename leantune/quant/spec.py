"""The quant settings: how a base is quantized (`QuantSpec`), where that comes from, and how it is written.

A `QuantSpec` is the resolved form of the run's `quant` config section (`resolve_spec`: "auto" compute
dtypes picked for the device), or of a folder saved quantized by bitsandbytes (`spec_from_saved`, reading
transformers' `quantization_config`); `quantization_config_dict` writes it back in that format.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import torch

from ..device import pick_dtype
from ..errors import ConfigError, ModelError

if TYPE_CHECKING:
    from ..config import QuantConfig

QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' blockwise kernels accept


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a base: the resolved form of the `quant` config section."""

    bits: int                       # 4 or 8
    type: str = "nf4"               # 4-bit code: nf4 | fp4
    double_quant: bool = True       # 4-bit: quantize the absmaxes too
    compute_dtype: torch.dtype = torch.float32  # 4-bit: the matmul runs in this dtype
    blocksize: int = 64             # 4-bit: values per absmax
    threshold: float = 6.0          # 8-bit: outlier threshold (transformers' llm_int8_threshold default)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ConfigError(f"quant.bits must be 4 or 8 (or null for no quantization), got {self.bits}")
        if self.type not in QUANT_TYPES:
            raise ConfigError(f"quant.type must be nf4 or fp4, got {self.type!r}")
        if self.blocksize not in BLOCKSIZES:
            raise ConfigError(f"quant.blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {self.blocksize}")


def require_bitsandbytes(bits: int) -> ModuleType:
    """bitsandbytes, or a one-line error saying how to do without it."""
    try:
        import bitsandbytes
    except Exception as e:  # noqa: BLE001 - ImportError, or a native library that fails to load
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"quant.bits {bits} needs bitsandbytes, which cannot be loaded here ({reason}); install it "
                          "(pip install 'bitsandbytes>=0.45') or set quant.bits: null to train on a bf16/fp32 "
                          "base") from None
    return bitsandbytes


def resolve_spec(quant: QuantConfig | QuantSpec | None, device: torch.device) -> QuantSpec | None:
    """The QuantSpec a `quant` config section asks for on `device` (None: no quantization)."""
    if quant is None or quant.bits is None:
        return None
    if isinstance(quant, QuantSpec):
        spec = quant
    else:
        if quant.compute_dtype == "fp16" and device.type == "cpu":
            raise ConfigError("quant.compute_dtype fp16 is not supported on CPU (no fast fp16 kernels: ~100x slower "
                              "than bf16 here); use quant.compute_dtype bf16 or fp32 (auto picks bf16 where the CPU "
                              "has avx512_bf16/amx_bf16)")
        compute = (torch.float16 if quant.compute_dtype == "fp16" else pick_dtype(quant.compute_dtype, device))
        spec = QuantSpec(bits=quant.bits, type=quant.type, double_quant=quant.double_quant, compute_dtype=compute,
                         blocksize=quant.blocksize)
    require_bitsandbytes(spec.bits)
    return spec


def spec_from_saved(qc: dict) -> QuantSpec:
    """The QuantSpec of a folder saved with a bitsandbytes `quantization_config`."""
    if qc.get("quant_method") != "bitsandbytes":
        raise ModelError(f"the model is quantized with {qc.get('quant_method')!r}; leantune loads bitsandbytes "
                         "4/8-bit checkpoints only: pass the unquantized model and set quant.bits instead")
    bits = 4 if qc.get("load_in_4bit") else 8
    compute = getattr(torch, str(qc.get("bnb_4bit_compute_dtype") or "float32").removeprefix("torch."))
    return QuantSpec(bits=bits, type=qc.get("bnb_4bit_quant_type", "nf4"),
                     double_quant=bool(qc.get("bnb_4bit_use_double_quant", False)), compute_dtype=compute,
                     threshold=float(qc.get("llm_int8_threshold", 6.0)))


def quantization_config_dict(spec: QuantSpec) -> dict:
    """`BitsAndBytesConfig(...).to_dict()` for `spec`, written out so that saving needs no transformers quirk."""
    four = spec.bits == 4
    return {"_load_in_4bit": four, "_load_in_8bit": not four,
            "bnb_4bit_compute_dtype": str(spec.compute_dtype).removeprefix("torch.") if four else "float32",
            "bnb_4bit_quant_storage": "uint8", "bnb_4bit_quant_type": spec.type if four else "fp4",
            "bnb_4bit_use_double_quant": spec.double_quant if four else False,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": None, "llm_int8_threshold": spec.threshold, "load_in_4bit": four,
            "load_in_8bit": not four, "quant_method": "bitsandbytes"}
