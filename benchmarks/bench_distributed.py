"""Several processes on one CPU machine: scaling, and memory per rank under DDP and FSDP2 (issue 15).

1. Throughput. The same global batch (4 rows of up to 256 tokens, LoRA r16 on all linear layers) trained by
   1 process x 2 threads (micro-batch 4) and by 2 processes x 1 thread (torchrun, micro-batch 2 each). Both
   train the identical steps (tests/e2e/test_distributed.py), so the ratio of step times is the throughput
   ratio; scaling efficiency = t(1 x 2 threads) / t(2 x 1 thread) (1.0: two processes are as fast as two
   threads in one). A step's time is the median gap between the `time` stamps of consecutive steps in
   metrics.jsonl, the first two steps left out (start-up, first-step measurement).
2. Memory per rank, full fine-tuning (AdamW), 2 processes x 1 thread: DDP (every rank holds the whole model,
   its gradients and optimizer state) against FSDP2 (each rank a half). Rank 0's own figures: its peak RSS
   (VmHWM) and the breakdown the run writes into summary.json (this rank's shards under FSDP2).

Fixture: `../shared/bench/make_fixture.py --size small` (a random Llama, hidden 512, 8 layers, vocab 32000).

    python benchmarks/bench_distributed.py                           # small fixture, 256 tokens per row
    python benchmarks/bench_distributed.py --seq 64 --steps 5        # a quick look (~5 minutes on 2 busy cores)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_BENCH = Path(os.environ.get("LEANTUNE_PEER_BENCH", ROOT.parent / "shared" / "bench"))
MIB = 2**20


def train(out: Path, model: Path, data: Path, *, nproc: int, threads: int, batch: int, steps: int, seq: int,
          extra: list[str]) -> dict:
    """One run (a fresh output_dir); its step time and rank 0's memory record."""
    shutil.rmtree(out, ignore_errors=True)
    args = ["train", "--model", str(model), "--data.path", str(data), "--data.format", "text", "--data.max_length", str(seq),
            "--data.eval_fraction", "0", "--train.batch_size", str(batch), "--train.max_steps", str(steps),
            "--train.save_every", "0", "--train.progress", "false", "--train.tensorboard", "false",
            "--threads", str(threads), "--dtype", "fp32", "--output_dir", str(out), *extra]
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
                if nproc > 1 else [sys.executable])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    r = subprocess.run([*launcher, "-m", "leantune", *args], env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"run {out.name} failed:\n{r.stderr[-3000:]}")
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    times = [m["time"] for m in recs if "loss" in m]
    gaps = [b - a for a, b in zip(times[2:], times[3:])]
    summary = json.loads((out / "summary.json").read_text())
    return {"step_s": statistics.median(gaps), "loss": summary["train_loss"], "memory": summary.get("memory", {})}


def mib(rec: dict, key: str) -> float:
    return rec["memory"].get(f"mem_{key}_bytes", 0) / MIB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", help="fixture size from make_fixture.py (small, medium; tiny's vocab is too small for its tokenizer)")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (the first two are not timed)")
    ap.add_argument("--seq", type=int, default=256, help="data.max_length: tokens per packed row")
    ap.add_argument("--workdir", default=None, help="where the fixture and runs go (default: a temp dir)")
    a = ap.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="bench-dist-"))
    fix = work / f"fixture-{a.size}"
    if not (fix / "model").exists():
        subprocess.run([sys.executable, str(SHARED_BENCH / "make_fixture.py"), "--size", a.size, "--out", str(fix)],
                       check=True, capture_output=True)
    model, data = fix / "model", fix / "data.jsonl"
    lora = ["--lora.rank", "16", "--lora.alpha", "32", "--lora.targets", "all-linear"]

    one = train(work / "lora-1x2", model, data, nproc=1, threads=2, batch=4, steps=a.steps, seq=a.seq, extra=lora)
    two = train(work / "lora-2x1", model, data, nproc=2, threads=1, batch=2, steps=a.steps, seq=a.seq, extra=lora)
    print(f"throughput, LoRA r16, global batch 4 x {a.seq} tokens, fixture {a.size}:")
    print(f"  1 process x 2 threads : {one['step_s']:.3f} s/step  (final loss {one['loss']:.4f})")
    print(f"  2 processes x 1 thread: {two['step_s']:.3f} s/step  (final loss {two['loss']:.4f})")
    print(f"  scaling efficiency    : {one['step_s'] / two['step_s']:.2f}  (t(1x2) / t(2x1); >1: processes win)")

    full = ["--method", "full", "--train.lr", "1e-5"]
    rows = {}
    for strategy in ("ddp", "fsdp2"):
        rows[strategy] = train(work / f"full-{strategy}", model, data, nproc=2, threads=1, batch=2,
                               steps=min(a.steps, 4), seq=a.seq, extra=[*full, "--distributed.strategy", strategy])
    print(f"\nmemory per rank (rank 0), full fine-tuning, AdamW, 2 processes x micro-batch 2, fixture {a.size}:")
    print(f"  {'':6} {'peak RSS':>9} {'weights':>8} {'grads':>8} {'optimizer':>9}  MiB   s/step")
    for name, r in rows.items():
        print(f"  {name:6} {mib(r, 'peak'):9.0f} {mib(r, 'base_weights') + mib(r, 'trainable'):8.0f} "
              f"{mib(r, 'gradients'):8.0f} {mib(r, 'optimizer_state'):9.0f}       {r['step_s']:.3f}")
    print(f"  fsdp2 / ddp peak RSS: {mib(rows['fsdp2'], 'peak') / mib(rows['ddp'], 'peak'):.2f}")


if __name__ == "__main__":
    main()
