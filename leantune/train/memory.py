"""Memory accounting: where a run's bytes go, measured rather than quoted.

    peak          the process's high-water mark: torch.cuda.max_memory_allocated on CUDA; on CPU the kernel's
                  peak resident set (VmHWM in /proc/self/status, else getrusage's ru_maxrss). It covers the
                  whole process (Python, torch, the tokenizer, data), so it is larger than the sum below.
    base weights  frozen parameters and buffers; a quantized weight counts at its packed size plus its
                  block statistics (quant/layers.py storage_bits)
    trainable     parameters that train; their gradients are measured at the optimizer step
    optimizer     every tensor in optimizer.state (moments, 8-bit codes and their absmax, projections)
    activations   tensors autograd saved for the backward pass of one micro-batch, counted with
                  torch.autograd.graph.saved_tensors_hooks (storage de-duplicated, parameters excluded).
                  With gradient checkpointing the checkpointed layers save through their own hooks: what is
                  counted is then what lives outside them, and each layer keeps only its input.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..quant.layers import is_quantized, storage_bits

MiB = 1024 * 1024


def peak_memory_bytes(device: torch.device | str = "cpu") -> tuple[int, str]:
    """(peak bytes, what was measured)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated()), "cuda max_memory_allocated"
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "peak RSS (VmHWM)"
    import resource  # POSIX only: imported where it is needed, so importing this module works everywhere
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024), "peak RSS (getrusage)"  # bytes on macOS, KiB elsewhere


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of an FSDP2-sharded tensor (a DTensor); any other tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def _nbytes(t: torch.Tensor) -> int:
    t = _local(t)
    return t.numel() * t.element_size()


def tensor_bytes(obj) -> int:
    """Bytes of every tensor inside nested dicts/lists/tuples (an optimizer's per-parameter state)."""
    if isinstance(obj, torch.Tensor):
        return _nbytes(obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(tensor_bytes(s) for s in optimizer.state.values())


def parameter_bytes(model: nn.Module) -> dict[str, int]:
    """{"base_weights": frozen params + buffers, "trainable": trainable params}. A quantized layer's weight
    counts with its statistics (absmax, nested absmax, code tables), which live outside the parameter."""
    quantized = [m for m in model.modules() if is_quantized(m)]
    packed = {id(m.weight) for m in quantized}
    frozen = sum(_nbytes(p) for p in model.parameters() if not p.requires_grad and id(p) not in packed)
    frozen += sum(storage_bits(m)[0] // 8 for m in quantized)
    buffers = sum(_nbytes(b) for b in model.buffers())
    trainable = sum(_nbytes(p) for p in model.parameters() if p.requires_grad)
    return {"base_weights": frozen + buffers, "trainable": trainable}


def gradient_bytes(model: nn.Module) -> int:
    return sum(_nbytes(p.grad) for p in model.parameters() if p.grad is not None)


class SavedTensorMeter:
    """Counts the bytes autograd saves for backward inside the `with` block, each storage once and no
    parameter (a Linear saves its weight, which is already counted as weights)."""

    def __init__(self, model: nn.Module):
        self._params = {_local(p).untyped_storage().data_ptr() for p in model.parameters()}
        self._seen: set[int] = set()
        self.bytes = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
        except (RuntimeError, NotImplementedError):  # tensor subclasses without storage: count by size
            self.bytes += _nbytes(t)
            return t
        if ptr not in self._params and ptr not in self._seen:
            self._seen.add(ptr)
            self.bytes += storage.nbytes()
        return t

    def __enter__(self) -> SavedTensorMeter:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def breakdown(model: nn.Module, optimizer: torch.optim.Optimizer, *, grad_bytes: int, activation_bytes: int,
              device: torch.device | str) -> dict:
    """The memory record a run writes to metrics.jsonl and summary.json (bytes, plus MiB for reading)."""
    params = parameter_bytes(model)
    peak, source = peak_memory_bytes(device)
    out = {"peak": peak, "base_weights": params["base_weights"], "trainable": params["trainable"],
           "gradients": grad_bytes, "optimizer_state": optimizer_state_bytes(optimizer),
           "activations": activation_bytes}
    record = {f"mem_{k}_bytes": v for k, v in out.items()}
    record["mem_peak_source"] = source
    record["mem_activations_method"] = "saved_tensors_hooks, one micro-batch"
    return record


def describe(record: dict) -> str:
    """One console line: 'memory: peak 812 MiB (peak RSS); weights 270, trainable 1.2 (+1.2 grads), ...'."""
    mib = {k.removeprefix("mem_").removesuffix("_bytes"): v / MiB for k, v in record.items() if k.endswith("_bytes")}
    return (f"memory: peak {mib['peak']:.0f} MiB ({record['mem_peak_source']}); base weights {mib['base_weights']:.1f}, "
            f"trainable {mib['trainable']:.1f} + grads {mib['gradients']:.1f}, optimizer state "
            f"{mib['optimizer_state']:.1f}, activations {mib['activations']:.1f} MiB")
