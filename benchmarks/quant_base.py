"""A 4-bit (NF4 + double quant) base against an fp32 one on the demo model (SmolLM2-135M): storage
bits per weight, load time, peak RSS, and one LoRA forward+backward step.

Each configuration runs in its own process, so its peak RSS (ru_maxrss) is its own. RSS after the
imports is subtracted so that torch/transformers/bitsandbytes' code does not count. Step time is the
median of `--steps` steps after one warm-up, wall and CPU (user+sys) seconds: CPU time is steadier
on a shared machine.

    python benchmarks/quant_base.py                  # both, 1x256 tokens, LoRA r16 all-linear
    python benchmarks/quant_base.py --tokens 128 --steps 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's leantune, not whichever one the venv installed


def measure(mode: str, tokens: int, steps: int) -> dict:
    import resource

    import bitsandbytes  # noqa: F401 - imported before the baseline RSS so its code does not count
    import torch
    import transformers  # noqa: F401

    from leantune.adapters.base import mark_only_adapters_trainable
    from leantune.adapters.lora import inject_lora
    from leantune.config import QuantConfig
    from leantune.models.demo_model import demo_model_dir
    from leantune.models.load import load_model
    from leantune.quant import is_quantized, storage_bits

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    src, base_rss = str(demo_model_dir()), peak_mb()
    t0 = time.perf_counter()
    quant = QuantConfig(bits=4, compute_dtype="fp32") if mode == "nf4" else None
    model = load_model(src, dtype="fp32", device="cpu", quant=quant)
    out = {"mode": mode, "load_s": time.perf_counter() - t0, "load_peak_mb": peak_mb() - base_rss}
    q_bits = q_n = 0
    for m in model.modules():
        if is_quantized(m):
            b, n = storage_bits(m)
            q_bits, q_n = q_bits + b, q_n + n
    kept = {id(p): p for n, p in model.named_parameters() if not is_quantized_param(p)}
    hp_bits = sum(p.numel() * p.element_size() * 8 for p in kept.values())
    out.update(quantized_weights=q_n, bits_per_quantized_weight=q_bits / q_n if q_n else None,
               high_precision_params=sum(p.numel() for p in kept.values()),
               model_mb=(q_bits + hp_bits) / 8 / 2**20)
    model.config.use_cache = False
    torch.manual_seed(0)
    inject_lora(model, rank=16, alpha=32)
    mark_only_adapters_trainable(model)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    wall, cpu = [], []
    for _ in range(steps + 1):
        w0, c0 = time.perf_counter(), time.process_time()
        model(input_ids=ids, labels=ids).loss.backward()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    out.update(step_wall_s=statistics.median(wall[1:]), step_cpu_s=statistics.median(cpu[1:]),
               step_peak_mb=peak_mb() - base_rss)
    return out


def is_quantized_param(p) -> bool:
    return type(p).__name__ in ("Params4bit", "Int8Params")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--one", choices=["fp32", "nf4"], help=argparse.SUPPRESS)  # the child process
    ns = ap.parse_args()
    if ns.one:
        print(json.dumps(measure(ns.one, ns.tokens, ns.steps)))
        return
    rows = []
    for mode in ("fp32", "nf4"):
        proc = subprocess.run([sys.executable, __file__, "--one", mode, "--tokens", str(ns.tokens), "--steps",
                               str(ns.steps)], cwd=ROOT, capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print("| base | bits/weight (quantized linears) | model MB | load s | load peak RSS MB | step wall s | "
          "step CPU s | step peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        bits = f"{r['bits_per_quantized_weight']:.4f}" if r["bits_per_quantized_weight"] else "32"
        print(f"| {r['mode']} | {bits} | {r['model_mb']:.1f} | {r['load_s']:.1f} | {r['load_peak_mb']:.0f} | "
              f"{r['step_wall_s']:.2f} | {r['step_cpu_s']:.2f} | {r['step_peak_mb']:.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
