"""Export speed: SmolLM2-135M (the demo model) to GGUF Q4_K_M, or through GPTQ/AWQ, on this machine's CPU cores.

Target (issue 6): under 60 s on 2 cores, model load excluded (time to quantize + write the file).
Also times the k-quant kernels alone on a 576x1536-sized slab per type, as M weights per second.
Target (issue 12): GPTQ and AWQ 4-bit (group 64, the default 16 x 128 calibration tokens of the demo's
training data) under 60 s each; `--format gptq|awq` times the layer-by-layer quantization alone (no write).

    nice -n 19 python -m benchmarks.export_speed [--quant Q4_K_M] [--threads 2]
    nice -n 19 python -m benchmarks.export_speed --format gptq --threads 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def kernel_rates(n: int = 1536 * 1024) -> dict[str, float]:
    import torch

    from leantune.export.gguf.kquants import quantize_k

    x = torch.randn(n // 1024, 1024) * 0.02
    rates = {}
    for qtype in ("Q4_K", "Q5_K", "Q6_K"):
        c0 = time.process_time()
        quantize_k(x, qtype)
        rates[qtype] = n / (time.process_time() - c0) / 1e6  # per CPU-second
    return rates


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--format", choices=("gguf", "gptq", "awq"), default="gguf")
    args = ap.parse_args()
    if args.format != "gguf":
        return wna16_speed(args.format, args.threads)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leantune.export.gguf.writer import write_gguf
    from leantune.models.demo_model import demo_model_dir

    torch.set_num_threads(args.threads)
    folder = demo_model_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "smol.gguf"
        t0, c0 = time.perf_counter(), time.process_time()
        records = write_gguf(model, tok, folder, out, args.quant, progress=False)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
        size = out.stat().st_size
    types = {}
    for r in records:
        types[r.qtype] = types.get(r.qtype, 0) + 1
    # CPU seconds too: on a shared machine the wall time mostly measures the queue for the cores.
    print(f"SmolLM2-135M -> {args.quant}: {seconds:.1f} s wall, {cpu:.1f} s CPU with {args.threads} threads "
          f"(load average {os.getloadavg()[0]:.1f}), {size / 1e6:.1f} MB, tensor types {types}")
    print("k-quant kernels (M weights per CPU-second):", {k: round(v, 2) for k, v in kernel_rates().items()})


def wna16_speed(method: str, threads: int) -> None:
    """GPTQ or AWQ of SmolLM2-135M's decoder layers with the export's defaults: wall and CPU seconds."""
    import torch

    from leantune.export import wna16
    from leantune.export.awq import solve as awq_solve
    from leantune.export.calibration import calibration_rows
    from leantune.export.gptq import solve as gptq_solve
    from leantune.infer.materialize import materialize
    from leantune.models.demo_model import demo_model_dir

    torch.set_num_threads(threads)
    model, tok, _ = materialize(str(demo_model_dir()))
    model.eval()
    demo = Path(__file__).resolve().parents[1] / "leantune" / "assets" / "demo" / "train.jsonl"
    calib = calibration_rows(tok, file=str(demo), source=None)
    spec = wna16.Spec(method, 4, 0, sym=method == "gptq")
    spec.check(model, "GPTQ_V1" if method == "gptq" else "GEMM")
    solve = gptq_solve if method == "gptq" else awq_solve
    t0, c0 = time.perf_counter(), time.process_time()
    q = wna16.quantize_layers(model, calib.rows, spec, lambda layer, walk: solve(layer, walk, spec), show=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"SmolLM2-135M {method} 4-bit group {spec.group_size}, calibration {calib.describe()}: {seconds:.1f} s "
          f"wall, {cpu:.1f} s CPU with {threads} threads (load average {os.getloadavg()[0]:.1f}), "
          f"{len(q.linears)} Linears")


if __name__ == "__main__":
    main()
