"""Fill a model skeleton from safetensors files one tensor at a time, quantizing Linear weights on the way.

The 16-bit model never exists whole. The caller builds the model with its parameters on the meta
device (`params_on_meta`: no memory, no random init; buffers such as rotary frequencies stay real),
swaps the Linear layers to quantize for empty quantized ones (`swap_in_quant_linears`), and then
`fill_from_safetensors` walks the checkpoint module by module: a float weight of a quantized layer is
read (plain reads, no memory map), cast to the load dtype and quantized, and dropped; a prequantized one (saved by
leantune or by transformers + bitsandbytes) is taken as stored; everything else is cast and set.
Peak memory is the quantized model plus one float tensor.

Norm weights are kept in fp32, as PEFT's prepare_model_for_kbit_training leaves them: they are tiny.
Their outputs, though, go back to the compute dtype (`norm_outputs_in`): an fp32 weight times the
normalised activations promotes them to fp32, and from there the whole residual stream, the adapters'
products and attention would run in fp32 (measured on an H100: attention in the eager fp32 path, 2.1x
the peer's step). The norm's statistics stay fp32 inside the model's own code; only its output is
rounded, once, as a bf16 model's norm rounds it.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from ..io.tensor_file import tensor_index
from .layers import is_quantized, load_prequantized, new_quant_linear, quantize_weight
from .spec import QuantSpec


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers are built for real."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and param.device.type != "meta":
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def quantizable_linears(model: nn.Module, keep: Sequence[nn.Module] = ()) -> list[str]:
    """Paths of the plain nn.Linear layers to quantize: all of them but those in `keep` (the output
    embedding), the set transformers' replace_with_bnb_linear converts."""
    kept = {id(m) for m in keep}
    return [p for p, m in model.named_modules() if type(m) is nn.Linear and id(m) not in kept]


def swap_in_quant_linears(model: nn.Module, paths: Sequence[str], spec: QuantSpec) -> None:
    for path in paths:
        old = model.get_submodule(path)
        parent_path, _, leaf = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, leaf, new_quant_linear(old.in_features, old.out_features, old.bias is not None, spec))


def _is_norm(module: nn.Module) -> bool:
    # Duck-typed: LayerNorm, RMSNorm and every model's own *RMSNorm/*LayerNorm class.
    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.lower().endswith("norm")


def norm_outputs_in(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every norm's floating output to `dtype` (bf16/fp16; nothing to do for fp32) with a forward hook,
    so that activations stay in the compute dtype past fp32 norm weights. Returns how many norms it hooks."""
    if dtype not in (torch.bfloat16, torch.float16):
        return 0
    norms = [m for m in model.modules() if _is_norm(m) and any(True for _ in m.parameters(recurse=False))]

    def to_compute_dtype(module: nn.Module, args, output):
        return output.to(dtype) if isinstance(output, torch.Tensor) and output.is_floating_point() else output

    for norm in norms:
        norm.register_forward_hook(to_compute_dtype)
    return len(norms)


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    old = module._parameters[name]
    module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad if old is not None else False)


def fill_from_safetensors(model: nn.Module, files: Sequence[str | Path], *, dtype: torch.dtype,
                          device: torch.device | str = "cpu") -> list[str]:
    """Load every tensor of `files` into `model` (see the module docstring); return the names of the
    parameters the files did not provide (tied weights, for the caller to tie)."""
    index = tensor_index(files)
    modules = dict(model.named_modules())
    by_module: dict[str, dict[str, str]] = defaultdict(dict)  # module path -> {local key: full key}
    for key in index:
        path = next((p for p in _prefixes(key) if p in modules and is_quantized(modules[p])), None)
        if path is None:
            path, _, local = key.rpartition(".")
        else:
            local = key[len(path) + 1:]
        by_module[path][local] = key
    unknown = [k for p, keys in by_module.items() for k in keys.values() if p not in modules]
    if unknown:
        raise ModelError(f"the checkpoint holds {unknown[0]!r} (and {len(unknown) - 1} more), which this model "
                         "does not have; load it without quant.bits, or check that config.json fits the weights")
    quantized_weights = [keys["weight"] for p, keys in by_module.items() if is_quantized(modules[p]) and "weight" in keys]
    scratch = bytearray(max((index[k].nbytes(k) for k in quantized_weights), default=0))

    def read(key: str, transient: bool = False) -> torch.Tensor:
        return index[key].get(key, scratch if transient else None)

    for path, keys in by_module.items():
        _fill_module(modules[path], path, keys, read, lambda k: index[k].dtype(k), dtype, device)
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p.device.type == "meta"]


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        return None


def _return_freed_memory() -> None:
    """Hand the quantizer's freed temporaries back to the OS (glibc's malloc_trim). Without it glibc keeps
    them between the quantized weights allocated after them: measured on SmolLM2-135M, 200 MB of
    freed-but-held memory, more than the whole 4-bit model (160 MB)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _prefixes(key: str) -> Iterator[str]:
    """"a.b.weight.absmax" -> "a.b.weight", "a.b", "a": the module paths a key may belong to."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        yield ".".join(parts[:i])


def _fill_module(module: nn.Module, path: str, keys: dict[str, str], read, stored_dtype, dtype: torch.dtype,
                 device: torch.device | str) -> None:
    def get(local: str, transient: bool = False) -> torch.Tensor:
        return read(keys[local], transient)

    if is_quantized(module):
        if "weight" not in keys:
            raise ModelError(f"the checkpoint has no weight for {path}; it is incomplete")
        extra = set(keys) - {"weight", "bias"}
        if extra or not stored_dtype(keys["weight"]).is_floating_point:  # serialized by bitsandbytes: as stored
            load_prequantized(module, {k: get(k) for k in keys if k != "bias"}, device)
        else:  # cast first, as transformers does: the same input gives the same blocks
            quantize_weight(module, get("weight", transient=True).to(dtype), device)
            _return_freed_memory()
        if "bias" in keys:
            _set_param(module, "bias", get("bias").to(device=device, dtype=dtype))
        return
    target = torch.float32 if _is_norm(module) else dtype
    for local in keys:
        if local in module._parameters:
            _set_param(module, local, get(local).to(device=device, dtype=target))
        elif local in module._buffers:
            module._buffers[local] = get(local).to(device=device)
        else:
            raise ModelError(f"the checkpoint holds {path}.{local}, which this model does not have; load it without "
                             "quant.bits, or check that config.json fits the weights")
