"""Host -> device copies of batch tensors that do not stall the host.

A copy from pageable host memory to a GPU is synchronous: the host waits for the device to drain before
it can queue the next kernel (the profile in issue 17 shows 252 ms of `Memcpy HtoD (Pageable -> Device)`
over 8 steps). From pinned (page-locked) memory the copy is queued behind the running kernels and the host
goes on. torch's pinned-memory cache gives a block back only after the copy that reads it has finished.
"""

from __future__ import annotations

import torch
from torch import Tensor


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """`t` on `device`; through pinned memory with a non-blocking copy when it goes from the host to CUDA."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
