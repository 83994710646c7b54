"""Offloaded activation checkpointing: a checkpointed layer's saved input waits in host memory, not on the GPU.

With checkpointing, what stays alive between a layer's forward and its backward is its input (B x T x H per
layer; everything inside the layer is recomputed). `OffloadSaved` is a saved-tensors hook put around the
checkpoint call only (train/setup.py): the one tensor that call saves, the layer's input, is copied to pinned
host memory without blocking (queued on the compute stream, so the copy is ordered before anything that
reuses the device buffer) and copied back, again without blocking, when the recompute unpacks it.

Unsloth's "unsloth" gradient checkpointing does the same with an autograd.Function of its own; here torch's
non-reentrant checkpoint does the recompute and only its input storage changes, so gradients equal plain
checkpointing's bit for bit (tests/unit/test_offload_checkpointing.py).

On a CPU there is nowhere to offload to: the hook keeps the tensor as is (and still counts it).
"""

from __future__ import annotations

import torch
from torch import Tensor


class OffloadSaved(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors of the wrapped region go to host memory (pinned, non-blocking) and come back on unpack.

    `counts` (class-wide, for tests and the planner's check): tensors packed and unpacked, bytes moved to host."""

    counts = {"packed": 0, "unpacked": 0, "bytes": 0}

    def __init__(self, copy_on_cpu: bool = False):
        # copy_on_cpu: make the host copy even for a CPU tensor (tests exercise the round trip that way)
        super().__init__(lambda t: self._pack(t, copy_on_cpu), self._unpack)

    @staticmethod
    def _pack(t: Tensor, copy_on_cpu: bool):
        counts = OffloadSaved.counts
        counts["packed"] += 1
        if t.device.type == "cpu" and not copy_on_cpu:
            return t.device, t
        host = torch.empty(t.shape, dtype=t.dtype, layout=t.layout, pin_memory=t.device.type == "cuda")
        host.copy_(t, non_blocking=t.device.type == "cuda")
        counts["bytes"] += t.numel() * t.element_size()
        return t.device, host

    @staticmethod
    def _unpack(packed) -> Tensor:
        device, host = packed
        OffloadSaved.counts["unpacked"] += 1
        if host.device == device:
            return host
        return host.to(device, non_blocking=True)

    @classmethod
    def reset_counts(cls) -> None:
        cls.counts = {"packed": 0, "unpacked": 0, "bytes": 0}


def offloaded_checkpoint(function, *args, copy_on_cpu: bool = False, **kwargs):
    """torch.utils.checkpoint.checkpoint(function, *args, **kwargs) with its saved inputs in host memory."""
    from torch.utils.checkpoint import checkpoint
    with OffloadSaved(copy_on_cpu):
        return checkpoint(function, *args, **kwargs)
