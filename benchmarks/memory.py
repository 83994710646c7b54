"""Peak memory and step time per fine-tuning configuration, on one model, each in its own process.

Configurations (each with and without gradient checkpointing): full fine-tuning, LoRA, QLoRA NF4, QLoRA
NF4 + double quantization, LoRA + 8-bit AdamW, all on a base in `--dtype` (bf16 where the CPU has native
bf16, else fp32: emulated bf16 is ~3x slower and would make the step times meaningless). Every run is
`python -m leantune.cli.main train ... --train.max_steps N` in a fresh process, so nothing one run
allocates is still held by the next:

    peak memory   the process's peak RSS from the kernel (os.wait4's ru_maxrss), on CPU; on a GPU also the
                  run's torch.cuda.max_memory_allocated (its summary.json), which is what decides "does it
                  fit"; the summary adds the breakdown (base weights, optimizer state, saved activations)
    step time     the median time between consecutive steps inside the N2-step run (its metrics.jsonl; the
                  first step, which warms kernels and allocators, left out); and (cpu(N2) - cpu(N1)) / (N2 - N1),
                  the difference of CPU time (user + sys, from wait4) of the two runs, steadier on a shared machine

The QLoRA rows need the 4-bit base (`--quant.bits 4 --quant.type nf4 --quant.double_quant true|false`);
where this checkout cannot quantize (no leantune.quant), they are skipped with the reason printed.

    python benchmarks/memory.py                              # demo SmolLM2-135M, ~10 min on 2 cores
    python benchmarks/memory.py --model path/to/hf-folder --n1 1 --n2 3 --out docs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "leantune" / "assets" / "demo" / "train.jsonl"

CONFIGS = {  # name -> CLI flags on top of the common ones
    "full": ["--method", "full"],
    "LoRA": ["--method", "lora"],
    "QLoRA nf4": ["--method", "lora", "--quant.bits", "4", "--quant.type", "nf4", "--quant.double_quant", "false"],
    "QLoRA nf4 + double quant": ["--method", "lora", "--quant.bits", "4", "--quant.type", "nf4",
                                 "--quant.double_quant", "true"],
    "LoRA + 8-bit AdamW": ["--method", "lora", "--train.optimizer", "adamw_8bit"],
}
MiB = 2**20


def quant_available() -> str | None:
    """None when this checkout can build a 4-bit base, else why not."""
    if not (ROOT / "leantune" / "quant").is_dir():
        return "this checkout has no leantune.quant (the quant branch is not merged)"
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # noqa: BLE001 - a native library that fails to load counts too
        return f"bitsandbytes cannot be loaded ({type(e).__name__})"
    return None


def train_once(model: str, flags: list[str], steps: int, out: Path, a) -> dict:
    cmd = [sys.executable, "-m", "leantune.cli.main", "train", "--model", model, "--data.path", str(DATA),
           "--output_dir", str(out), "--dtype", a.dtype, "--data.max_length", str(a.max_length),
           "--data.eval_fraction", "0", "--train.batch_size", str(a.batch_size), "--train.max_steps", str(steps), "--train.eval_every", "0",
           "--train.save_every", "0", "--train.progress", "false", "--train.tensorboard", "false",
           "--train.lr", "1e-5", "--train.warmup_steps", "0", "--train.log_every", "1", "--device", a.device, *flags]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = p.stdout.read().decode(errors="replace")  # read before waiting: a full pipe would block the child
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{log[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    from leantune.train.metrics import read_metrics

    times = sorted({r["step"]: r["time"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}.items())
    gaps = [b[1] - a_[1] for a_, b in zip(times[1:], times[2:])]  # from step 2 on: step 1 warms up
    return {"wall": wall, "cpu": ru.ru_utime + ru.ru_stime, "peak_rss": ru.ru_maxrss * 1024,
            "memory": summary.get("memory", {}), "log": log, "step_in_run": statistics.median(gaps) if gaps else None}


def measure(model: str, flags: list[str], a, work: Path) -> dict:
    runs = {n: train_once(model, flags, n, Path(tempfile.mkdtemp(dir=work)) / "run", a) for n in (a.n1, a.n2)}
    mem = runs[a.n2]["memory"]
    on_gpu = str(mem.get("mem_peak_source", "")).startswith("cuda")
    return {"peak_rss_mib": runs[a.n2]["peak_rss"] / MiB,
            "peak_gpu_mib": mem.get("mem_peak_bytes", 0) / MiB if on_gpu else None,
            "step_s": (runs[a.n2]["step_in_run"] if runs[a.n2]["step_in_run"] is not None
                       else (runs[a.n2]["wall"] - runs[a.n1]["wall"]) / (a.n2 - a.n1)),
            "step_cpu_s": (runs[a.n2]["cpu"] - runs[a.n1]["cpu"]) / (a.n2 - a.n1),
            **{k: mem.get(f"mem_{k}_bytes", 0) / MiB for k in
               ("base_weights", "trainable", "gradients", "optimizer_state", "activations")},
            "paging_note": next((ln for ln in runs[a.n2]["log"].splitlines() if "paging" in ln), "")}


def peak_mib(r: dict) -> float:
    return r["peak_gpu_mib"] if r.get("peak_gpu_mib") is not None else r["peak_rss_mib"]


def peak_label(rows: list[dict]) -> str:
    return "peak GPU allocated (MiB)" if rows and rows[0].get("peak_gpu_mib") is not None else "peak RSS (MiB)"


def table(rows: list[dict], skipped: list[str]) -> str:
    head = (f"| configuration | checkpointing | {peak_label(rows)} | step wall (s) | step CPU (s) | base weights | "
            "trainable | optimizer state | saved activations |\n|---|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = [f"| {r['config']} | {'on' if r['checkpointing'] else 'off'} | {peak_mib(r):.0f} | "
             f"{r['step_s']:.2f} | {r['step_cpu_s']:.2f} | {r['base_weights']:.1f} | {r['trainable']:.1f} | {r['optimizer_state']:.1f} | "
             f"{r['activations']:.1f} |" for r in rows]
    notes = [f"\nskipped: {s}" for s in skipped]
    return head + "\n".join(lines) + "".join(notes) + "\n"


def chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{r['config']}\n{'ckpt' if r['checkpointing'] else 'no ckpt'}" for r in rows]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(13, 0.5 * len(rows) + 1.5), sharey=True)
    y = range(len(rows))
    ax_m.barh(y, [peak_mib(r) for r in rows], color="#4878a8")
    ax_m.set_xlabel(peak_label(rows))
    ax_t.barh(y, [r["step_s"] for r in rows], color="#d08040", label="wall")
    ax_t.barh(y, [r["step_cpu_s"] for r in rows], color="#603010", height=0.35, label="CPU (user+sys)")
    ax_t.set_xlabel("step time (s)")
    ax_t.legend(loc="lower right", fontsize=8)
    ax_m.set_yticks(list(y), labels, fontsize=8)
    ax_m.invert_yaxis()
    fig.suptitle("leantune: peak memory and step time per configuration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="HF folder or hub id (default: the demo SmolLM2-135M)")
    ap.add_argument("--n1", type=int, default=1)
    ap.add_argument("--n2", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--dtype", default="auto", help="base dtype for every row: auto (bf16 where the CPU runs it "
                    "natively, else fp32), bf16 or fp32; the 4-bit rows compute in the same dtype")
    ap.add_argument("--device", default="auto", help="auto (a GPU when torch sees one), cpu or cuda")
    ap.add_argument("--only", nargs="*", default=None, help="configuration names to run (default: all)")
    ap.add_argument("--checkpointing-only", action="store_true", help="skip the rows without checkpointing")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for memory_table.md, memory.png, memory.json")
    a = ap.parse_args()
    if a.model is None:
        sys.path.insert(0, str(ROOT))
        from leantune.models.demo_model import demo_model_dir

        a.model = str(demo_model_dir())
    why_not = quant_available()
    rows, skipped = [], []
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # All configurations without checkpointing first, then with: a run cut short still covers every method.
    plan = [(name, flags, ckpt) for ckpt in (False, True) for name, flags in CONFIGS.items()
            if (not a.only or name in a.only) and (ckpt or not a.checkpointing_only)]
    with tempfile.TemporaryDirectory(prefix="leantune-mem-") as tmp:
        for name, flags, ckpt in plan:
            if "--quant.bits" in flags and why_not:
                if not ckpt:
                    skipped.append(f"{name}: {why_not}")
                    print(f"skip {name}: {why_not}", flush=True)
                continue
            r = measure(a.model, [*flags, "--train.gradient_checkpointing", str(ckpt).lower()], a, Path(tmp))
            r.update(config=name, checkpointing=ckpt)
            rows.append(r)
            print(f"{name:28s} ckpt={'on ' if ckpt else 'off'} peak {peak_mib(r):7.0f} MiB  step "
                  f"{r['step_s']:.2f} s wall, {r['step_cpu_s']:.2f} s CPU", flush=True)
            write_results(out, a, rows, skipped)  # after every row: a run cut short keeps what it measured
    print(table(rows, skipped))


def write_results(out: Path, a, rows: list[dict], skipped: list[str]) -> None:
    order = list(CONFIGS)
    rows = sorted(rows, key=lambda r: (order.index(r["config"]), r["checkpointing"]))
    (out / "memory_table.md").write_text(table(rows, skipped))
    meta = {"model": a.model, "dtype": a.dtype, "device": a.device, "n1": a.n1, "n2": a.n2, "batch_size": a.batch_size,
            "max_length": a.max_length}
    (out / "memory.json").write_text(json.dumps({**meta, "rows": rows, "skipped": skipped}, indent=1))
    chart(rows, out / "memory.png")


if __name__ == "__main__":
    main()
