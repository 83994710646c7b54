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
from ..io.atomic import write_json
from ..models.gguf_import import cache_root

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


def meminfo(field: str = "MemTotal") -> int:
    """A /proc/meminfo field in bytes (0 where there is none: not Linux)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def host_memory() -> int:
    return meminfo("MemTotal")


def cpu_device(tflops: float | None = None) -> Device:
    measured = tflops is None
    t = measure_cpu_tflops() if measured else tflops
    return Device("this CPU", host_memory(), t, None, "measured: fp32 matmul probe" if measured else "--tflops",
                  "cpu", bf16=False)


# The modules a training run imports before its model loads: their resident set is the CPU runtime a run
# carries. A 4/8-bit base or a bitsandbytes optimizer adds bitsandbytes (~110 MiB of RSS on this machine).
RUN_IMPORTS = ("torch", "transformers", "leantune.train.loop")


def _rss_of_fresh_process(imports: tuple[str, ...]) -> int:
    """RSS of a fresh process that imported `imports` and then trained a 1-layer, 64-wide Llama for two AdamW
    steps: torch pages in its CPU kernels, the autograd engine and its thread pools on first use (~185 MiB
    more than the imports alone here), and every run does that before its own peak."""
    import subprocess
    import sys

    code = ("import importlib, sys\nfor m in sys.argv[1:]: importlib.import_module(m)\n"
            "import torch\nfrom transformers import LlamaConfig, LlamaForCausalLM\n"
            "m = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, "
            "num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))\n"
            "opt = torch.optim.AdamW(m.parameters()); x = torch.randint(0, 256, (2, 32))\n"
            "for _ in range(2):\n    m(input_ids=x, labels=x).loss.backward(); opt.step(); opt.zero_grad()\n"
            "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmRSS:')))")
    p = subprocess.run([sys.executable, "-c", code, *imports], capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise OSError(p.stderr.strip()[-200:])
    return int(p.stdout.split()[-1]) * 1024


def process_baseline(bitsandbytes: bool = False) -> int:
    """Resident set of a fresh Python process that has imported what a training run imports (RUN_IMPORTS, and
    bitsandbytes when the run uses it) and run a tiny training step (_rss_of_fresh_process):
    measured once per interpreter and library versions on this machine, then kept in
    $LEANTUNE_CACHE/plan/baseline.json. 0 where /proc is missing (not Linux): the caller falls back."""
    import json
    import os
    import subprocess
    import sys
    from importlib import metadata

    if not os.path.exists("/proc/self/status"):
        return 0
    versions = []
    imports = RUN_IMPORTS + (("bitsandbytes",) if bitsandbytes else ())
    for dist in ("torch", "transformers", "bitsandbytes"):
        try:
            versions.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{dist} absent")
    key = f"{sys.executable} {' '.join(versions)} imports {','.join(imports)} + tiny step"
    path = cache_root() / "plan" / "baseline.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), int):
        return known[key]
    try:
        rss = _rss_of_fresh_process(imports)
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0
    known[key] = rss
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, known)
    except OSError:
        pass  # a read-only cache: measured again next time
    return rss

