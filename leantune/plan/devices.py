"""Devices a plan is made for: memory, matmul throughput and memory bandwidth.

Memory is what nvidia-smi reports as the card's total (MiB); the CUDA context and the allocator's
reserve come on top of torch's max_memory_allocated, so a plan fits when peak + CUDA_OVERHEAD <= memory.
Throughput is dense bf16 tensor-core TFLOP/s: measured where we measured it (the H100 row), else the
vendor's spec sheet (marked "spec"); real training reaches a fraction of it (MFU, see plan.report).
`--gpu 24GB` names a memory size alone and plans with an unnamed card's throughput left unknown.
"""

from __future__ import annotations

import difflib
import re
import time
from dataclasses import dataclass

from ..errors import ConfigError

MiB = 2**20
GiB = 2**30

CUDA_OVERHEAD = 1 * GiB  # CUDA context (~0.5 GiB on an H100 with torch 2.11) plus allocator reserve


@dataclass(frozen=True)
class Device:
    name: str
    memory: int                  # bytes
    tflops: float | None         # dense bf16 (fp16 where the card has no bf16), TFLOP/s
    bandwidth: float | None      # GB/s of device memory
    source: str                  # "measured ..." or "spec"
    kind: str = "cuda"           # "cuda" or "cpu"
    bf16: bool = True

    @property
    def usable(self) -> int:
        return self.memory - (CUDA_OVERHEAD if self.kind == "cuda" else 0)


# name, memory (MiB, as nvidia-smi), dense bf16 TFLOP/s, GB/s, source, has bf16
_GPUS = [
    ("H100 80GB", 81559, 790.0, 3350, "measured: bf16 matmul on a lent H100 SXM (spec 989)", True),
    ("H200", 143771, 989.0, 4800, "spec", True),
    ("A100 80GB", 81920, 312.0, 2039, "spec", True),
    ("A100 40GB", 40960, 312.0, 1555, "spec", True),
    ("L40S", 46068, 362.0, 864, "spec", True),
    ("RTX A6000", 49140, 155.0, 768, "spec", True),
    ("RTX 4090", 24564, 165.0, 1008, "spec", True),
    ("RTX 3090", 24576, 71.0, 936, "spec", True),
    ("L4", 23034, 121.0, 300, "spec", True),
    ("A10", 23028, 125.0, 600, "spec", True),
    ("T4", 15360, 65.0, 320, "spec (fp16: no bf16, leantune trains fp32 there)", False),
    ("RTX 4080", 16376, 97.0, 717, "spec", True),
    ("RTX 3060", 12288, 51.0, 360, "spec", True),
]
GPUS = {n: Device(n, m * MiB, t, b, src, "cuda", bf) for n, m, t, b, src, bf in _GPUS}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("nvidia", "").replace("geforce", ""))


def parse_gpu(text: str) -> Device:
    """`24GB`, `80 GiB`, `24576MiB` (a size) or a card's name (`RTX 4090`, `h100`, `A100 40GB`)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(gb|gib|g|mb|mib)\s*", text, re.IGNORECASE)
    if m:
        value, unit = float(m.group(1)), m.group(2).lower()
        size = int(value * (MiB if unit.startswith("m") else GiB))
        if size <= 0:
            raise ConfigError(f"--gpu {text!r} is no memory size; give a size such as 24GB or a card such as 'RTX 4090'")
        return Device(f"{text.strip()} GPU", size, None, None, "size given", "cuda")
    key = _key(text)
    by_key = {_key(n): d for n, d in GPUS.items()}
    if key in by_key:
        return by_key[key]
    starts = [d for k, d in by_key.items() if k.startswith(key)] if key else []
    if len(starts) == 1 or (starts and all(d.name.startswith(starts[0].name.split()[0]) for d in starts)):
        return starts[0]  # "h100" -> H100 80GB; "a100" -> A100 80GB (the first listed)
    close = difflib.get_close_matches(text, list(GPUS), n=1, cutoff=0.3) or \
        [GPUS[n].name for n in GPUS if key and key[:3] in _key(n)][:1]
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise ConfigError(f"unknown GPU {text!r}: {hint}known: {', '.join(GPUS)}; or give its memory, e.g. --gpu 24GB")


def measure_cpu_tflops(n: int = 1024, repeats: int = 3) -> float:
    """Dense fp32 matmul throughput of this CPU with torch's threads, best of a few (about a second)."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up: thread pool and oneDNN kernels
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def host_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_device(tflops: float | None = None) -> Device:
    measured = tflops is None
    t = measure_cpu_tflops() if measured else tflops
    return Device("this CPU", host_memory(), t, None, "measured: fp32 matmul probe" if measured else "--tflops",
                  "cpu", bf16=False)
