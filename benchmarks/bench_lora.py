"""leantune against Transformers Trainer + PEFT, side by side in one run, on the same fixture.

The peer side and the method are the shared benchmark's (`../shared/bench/`): a random-init Llama
fixture, LoRA r16 on all linear layers, batch 4, max 256 tokens, AdamW 2e-4 cosine. Per-step time is
(wall(N2) - wall(N1)) / (N2 - N1), so start-up and loading cancel; peak RSS comes from the kernel
(wait4). Runs alternate peer, leantune, peer, leantune... so machine noise hits both alike.

Tokens per second counts real (non-padding) tokens, per wall second and per CPU second (user+sys
from the kernel; steadier than wall time on a shared 2-core VM): the peer pads each batch of 4 texts to its
longest; leantune packs whole examples into rows of up to 256 tokens, so one of its steps holds more
text. Both are reported, with leantune unpacked (the same 4 texts per step) as the like-for-like row.
Each side is credited with the real tokens of the steps that were timed (n1+1..n2), counted inside its
process by step_tokens.py, not with an epoch mean.

    python benchmarks/bench_lora.py                 # fixture small, the issue's target setting
    python benchmarks/bench_lora.py --size tiny --n2 4 --repeats 1   # a quick look
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
SHARED_BENCH = Path(os.environ.get("LEANTUNE_PEER_BENCH", ROOT.parent / "shared" / "bench"))


ENV = dict(os.environ)


def run(cmd: list[str], gpu: bool = False) -> tuple[float, float, float, float | None, list[int]]:
    """(wall s, peak RSS MiB, CPU s, peak GPU MiB or None, real tokens of each step). The command runs under
    step_tokens.py (and on a GPU under cuda_peak.py too)."""
    peak_file = None
    if gpu:
        fd, peak_file = tempfile.mkstemp(prefix="cuda-peak-")
        os.close(fd)
        cmd = [cmd[0], str(Path(__file__).with_name("cuda_peak.py")), *cmd[1:]]
    fd, tokens_file = tempfile.mkstemp(prefix="step-tokens-")
    os.close(fd)
    cmd = [cmd[0], str(Path(__file__).with_name("step_tokens.py")), *cmd[1:]]
    t = time.perf_counter()
    env = {**ENV, "LEANTUNE_STEP_TOKENS_FILE": tokens_file}
    if peak_file:
        env["LEANTUNE_CUDA_PEAK_FILE"] = peak_file
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    err = p.stderr.read().decode(errors="replace")[-3000:]  # read before waiting: a full pipe would block it
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"command failed: {' '.join(cmd)}\n{err}")
    gpu_mib = None
    if peak_file:
        peaks = Path(peak_file).read_text().split()
        os.unlink(peak_file)
        gpu_mib = int(peaks[-1]) / 2**20 if peaks else None
    step_tokens = [int(x) for x in Path(tokens_file).read_text().split()]
    os.unlink(tokens_file)
    return wall, ru.ru_maxrss / 1024, ru.ru_utime + ru.ru_stime, gpu_mib, step_tokens  # s, MiB, CPU s, MiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="small", help="fixture size from make_fixture.py (tiny, small, bigvocab, medium)")
    ap.add_argument("--n1", type=int, default=2)
    ap.add_argument("--n2", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where the fixture and runs go (default: a temp dir)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for both sides (OMP_NUM_THREADS); default: torch's own (all cores). "
                         "1 gives steadier ratios while other jobs share the machine")
    ap.add_argument("--peer-flags", default="", help="extra flags for peer_peft.py, e.g. \"--base-bf16 --bf16\" "
                    "(a GPU's usual setting; leantune's dtype auto is bf16 there)")
    a = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    if a.threads:
        ENV.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    if not (SHARED_BENCH / "peer_peft.py").exists():
        raise SystemExit(f"peer benchmark not found at {SHARED_BENCH}; set LEANTUNE_PEER_BENCH to the shared/bench folder")

    py = sys.executable
    leantune = [py, "-m", "leantune.cli.main"]
    work = Path(a.workdir or tempfile.mkdtemp(prefix="leantune-bench-"))
    fix = work / f"fixture-{a.size}"
    if not (fix / "model" / "config.json").exists():
        subprocess.run([py, str(SHARED_BENCH / "make_fixture.py"), "--size", a.size, "--out", str(fix)], check=True,
                       stdout=subprocess.DEVNULL)
    model, data, seq, batch = fix / "model", fix / "data.jsonl", 256, 4

    def peer(steps: int) -> list[str]:
        return [py, str(SHARED_BENCH / "peer_peft.py"), "--model-dir", str(model), "--data", str(data),
                "--steps", str(steps), "--out", str(work / "peer-out"), *a.peer_flags.split()]

    def ours(packing: bool):
        def cmd(steps: int) -> list[str]:
            out = work / f"lt-{packing}-{steps}-{time.monotonic_ns()}"
            return leantune + ["train", "--model", str(model), "--data.path", str(data), "--data.format", "text",
                               "--data.max_length", str(seq), "--data.packing", str(packing).lower(),
                               "--data.eval_fraction", "0", "--lora.rank", "16", "--lora.alpha", "32",
                               "--train.batch_size", str(batch), "--train.lr", "2e-4", "--train.max_steps", str(steps),
                               "--train.warmup_steps", "1", "--train.save_every", "0", "--train.progress", "false",
                               "--train.tensorboard", "false", "--output_dir", str(out)]
        return cmd

    peer_name = f"peer (Trainer+PEFT{', ' + a.peer_flags if a.peer_flags else ', fp32'})"
    sides = {peer_name: peer, "leantune (packed)": ours(True), "leantune (unpacked)": ours(False)}
    res = {k: {"step": [], "rss": [], "cpu": [], "gpu": [], "tokens": []} for k in sides}
    for _ in range(a.repeats):
        for name, tmpl in sides.items():
            w1, _, c1, _, _ = run(tmpl(a.n1), gpu)
            w2, rss, c2, gpu_mib, step_tokens = run(tmpl(a.n2), gpu)
            if len(step_tokens) != a.n2:
                raise SystemExit(f"{name}: counted {len(step_tokens)} steps' tokens, expected {a.n2}")
            # The timed steps are those the n2 run takes beyond the n1 run: n1+1..n2 (same data order).
            res[name]["tokens"].append(statistics.mean(step_tokens[a.n1:]))
            res[name]["step"].append((w2 - w1) / (a.n2 - a.n1))
            res[name]["cpu"].append((c2 - c1) / (a.n2 - a.n1))
            res[name]["rss"].append(rss)
            if gpu_mib is not None:
                res[name]["gpu"].append(gpu_mib)

    # Real tokens per step: the mean over the timed steps, as each process counted them (step_tokens.py).
    tokens = {name: statistics.mean(res[name]["tokens"]) for name in sides}
    out = {}
    for name in sides:
        step = statistics.median(res[name]["step"])
        cpu = statistics.median(res[name]["cpu"])
        out[name] = {"step_s": round(step, 4), "cpu_s_per_step": round(cpu, 3),
                     "tokens_per_cpu_s": round(tokens[name] / cpu, 1), "tokens_per_step": round(tokens[name], 1),
                     "tokens_per_s": round(tokens[name] / step, 1), "peak_rss_mib": round(max(res[name]["rss"]), 1),
                     "peak_gpu_mib": round(max(res[name]["gpu"]), 1) if res[name]["gpu"] else None}
    ref = out[peer_name]
    where = f"GPU {torch.cuda.get_device_name()}" if gpu else f"{os.cpu_count()} cores"
    print(f"fixture {a.size}: LoRA r16 all-linear, batch {batch}, max {seq} tokens, {where}, "
          f"{a.threads or 'default'} threads; "
          f"steps {a.n1}->{a.n2}, {a.repeats} repeats\n")
    print(f"{'':28s} {'s/step':>8s} {'tok/step':>9s} {'tok/s':>8s} {'peak RSS':>9s} {'speed x':>8s} {'RSS x':>6s}"
          f" {'CPU s/step':>11s} {'tok/CPU-s x':>12s}" + (f" {'peak GPU':>9s} {'GPU x':>6s}" if gpu else ""))
    for name, r in out.items():
        r["tokens_per_s_ratio"] = round(r["tokens_per_s"] / ref["tokens_per_s"], 3)
        r["rss_ratio"] = round(r["peak_rss_mib"] / ref["peak_rss_mib"], 3)
        r["tokens_per_cpu_s_ratio"] = round(r["tokens_per_cpu_s"] / ref["tokens_per_cpu_s"], 3)
        print(f"{name:28s} {r['step_s']:8.3f} {r['tokens_per_step']:9.0f} {r['tokens_per_s']:8.0f} "
              f"{r['peak_rss_mib']:7.0f}Mi {r['tokens_per_s_ratio']:8.2f} {r['rss_ratio']:6.2f}"
              f" {r['cpu_s_per_step']:11.3f} {r['tokens_per_cpu_s_ratio']:12.2f}" + gpu_cols(r, ref))
    print("\nspeed x: real tokens per wall second against the peer; tok/CPU-s x: the same per CPU second "
          "(less sensitive to a noisy machine). Ratios are medians over the repeats of one run.")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=1))


def gpu_cols(r: dict, ref: dict) -> str:
    if r.get("peak_gpu_mib") is None or not ref.get("peak_gpu_mib"):
        return ""
    r["gpu_ratio"] = round(r["peak_gpu_mib"] / ref["peak_gpu_mib"], 3)
    return f" {r['peak_gpu_mib']:7.0f}Mi {r['gpu_ratio']:6.2f}"


if __name__ == "__main__":
    main()
