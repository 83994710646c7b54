"""Regional compilation: each decoder layer goes through torch.compile on its own (`train.compile: true`).

The decoder is one block repeated N times, so compiling the block rather than the whole model costs one
layer's compile time, not N layers' (torchtune's `compile_model`, https://pytorch.org/tutorials/recipes/
regional_compilation.html). The layers are compiled in place (`nn.Module.compile`): module paths and
state-dict keys stay as they are, so saving, checkpoints and HF gradient checkpointing (which wraps the
layer's call from outside) see the same model. Everything around the layers (embedding, rotary table,
masks, the chunked loss of ops/cross_entropy.py) stays eager.

What the compiled region holds and how it traces (torch._dynamo.explain over one layer, CPU, torch 2.13):
the fused LoRA node (ops/lora.py, a custom autograd.Function) traces as one graph with no break, in fp32
and with fp32 masters over a bf16 base; so does a 4-bit bitsandbytes base (0.50: its ops are registered
torch.library ops with fake kernels). The layers share their compiled graphs: they differ only in their
parameters, which dynamo treats as inputs (measured: 2 graphs for all layers, as the first layer's input
needs no gradient and the others' do; 1 with checkpointing).

Whether it pays depends on the device: inductor fuses the elementwise chains between the GEMMs (RMSNorm,
RoPE, SwiGLU, residual adds) into single kernels; on a GPU those are memory-bound launches, on a CPU the
GEMMs dominate (docs/benchmarks.md has the measurements).
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

import torch
from torch import nn

from ..errors import ConfigError


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks: modules whose class the model names in `_no_split_modules` (HF's list of
    blocks that must stay whole, e.g. LlamaDecoderLayer), else the longest ModuleList's entries."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if layers:
        return layers
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def check_compiler(device: torch.device) -> None:
    """Inductor writes C++ on a CPU and Triton on a GPU: refuse early, with the fix, when it cannot."""
    if device.type == "cpu" and not (os.environ.get("CXX") or any(shutil.which(c) for c in ("g++", "c++", "clang++"))):
        raise ConfigError("train.compile on a CPU needs a C++ compiler (inductor builds its kernels with one): "
                          "install g++ (apt-get install g++) or set train.compile: false")
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("train.compile on CUDA needs Triton (pip install triton, the version your torch "
                              "names) or set train.compile: false")


def compile_layers(model: nn.Module, *, backend: str = "inductor", console: Callable[[str], None] | None = None) -> int:
    """Compile each decoder layer in place; returns how many. The first step pays the compile time.

    dynamic=None: one static graph per shape; a second distinct sequence length makes dynamo compile
    one graph with a symbolic length (no recompile per length after that)."""
    layers = decoder_layers(model)
    if not layers:
        raise ConfigError(f"train.compile: found no repeated decoder layers in {type(model).__name__} to compile; "
                          "set train.compile: false")
    device = next(model.parameters()).device
    if backend == "inductor":
        check_compiler(device)
    # All layers share Module._call_impl's code object, hence one cache of compiled graphs: each distinct
    # guard set (train/eval, grad on/off, a new shape) takes an entry, so give room beyond the default 8.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in layers:
        layer.compile(backend=backend)
    if console:
        console(f"train.compile: {len(layers)} decoder layers ({type(layers[0]).__name__}) compiled with "
                f"torch.compile ({backend}); the first step includes the compile time")
    return len(layers)


def graph_breaks() -> int:
    """Graph breaks dynamo met so far in this process (0 means every compiled layer is one graph)."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())
