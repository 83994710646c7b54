"""Every fine-tuning method on the same model, data and budget: the comparison table, measured here.

Model: the demo model, SmolLM2-135M-Instruct (offline). Task: the shipped demo dataset
(leantune/assets/demo/train.jsonl: questions answered as one-line JSON), 10% held out. Each method
trains `--steps` optimizer steps through the real CLI in a subprocess of its own, so peak RSS (from the
kernel, wait4) is that method's alone. Reported per method:
  trainable %      the line the run prints (PEFT's print_trainable_parameters format)
  peak RSS         MiB, the whole process (model, data, optimizer state, activations)
  step time        median seconds between consecutive steps (metrics.jsonl timestamps)
  held-out loss    eval loss after the last step (before training: the base model's, for reference)
Learning rates are each method's usual range (LoRA-family 1e-3; IA3, prompt and prefix tuning need
larger ones), since one rate for all would rank the methods by how well that rate suits them.

    python benchmarks/methods.py                       # writes docs/methods_comparison.{md,png}
    python benchmarks/methods.py --steps 5 --layers 4  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "leantune" / "assets" / "demo" / "train.jsonl"

METHODS = {  # method: extra CLI arguments (its section and a learning rate in its usual range)
    "lora": ["--lora.rank", "16", "--lora.alpha", "32", "--train.lr", "1e-3"],
    "dora": ["--lora.rank", "16", "--lora.alpha", "32", "--train.lr", "1e-3"],
    "ia3": ["--train.lr", "1e-2"],
    "bottleneck": ["--bottleneck.size", "64", "--train.lr", "1e-3"],
    "prompt": ["--prompt.virtual_tokens", "20", "--prompt.init", "text", "--prompt.init_text",
               "Answer with one line of JSON giving the answer and the topic.", "--train.lr", "3e-2"],
    "prefix": ["--prefix.virtual_tokens", "20", "--prefix.projection", "true", "--train.lr", "3e-3"],
    "full": ["--train.lr", "5e-5"],
    "freeze": ["--freeze.train_last_layers", "4", "--train.lr", "1e-4"],
}
TRAINABLE = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: ([\d.]+)")


def train(method: str, model: str, out: Path, a) -> dict:
    cmd = [sys.executable, "-m", "leantune.cli.main", "train", "--model", model, "--data.path", str(DATA),
           "--output_dir", str(out), "--method", method, "--train.max_steps", str(a.steps), "--train.batch_size",
           str(a.batch), "--data.max_length", str(a.max_length), "--data.eval_fraction", "0.1",
           "--train.eval_every", "0", "--train.save_every", "0", "--train.progress", "false",
           "--train.tensorboard", "false", "--train.warmup_steps", "0", "--seed", "0", *METHODS[method]]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    start = time.perf_counter()
    # one pipe, read to the end before waiting: two pipes read in turn block when the other one fills
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    stdout = p.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(p.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{method} failed:\n{stdout[-2000:]}")
    count = TRAINABLE.search(stdout)
    from leantune.train.metrics import read_metrics

    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]  # step lines, not the memory line
    times = [r["time"] for r in records]
    summary = json.loads((out / "summary.json").read_text())
    return {"method": method, "trainable": int(count[1].replace(",", "")), "trainable_pct": float(count[3]),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "wall_s": round(time.perf_counter() - start, 1),
            "step_s": round(statistics.median(b - a for a, b in zip(times, times[1:])), 3),
            "first_loss": records[0]["loss"], "eval_loss": summary["eval_loss"]}


def markdown(rows: list[dict], a, model_note: str) -> str:
    lines = [f"Measured by `benchmarks/methods.py` on {model_note}, {a.steps} steps of batch {a.batch}, "
             f"max {a.max_length} tokens, on this machine's CPU ({os.cpu_count()} cores).", "",
             "| method | trainable params | trainable % | peak RSS (MiB) | step time (s) | held-out loss |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['trainable']:,d} | {r['trainable_pct']:.4f} | {r['peak_rss_mib']} | "
                     f"{r['step_s']:.2f} | {r['eval_loss']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in rows]
    panels = [("trainable %", "trainable_pct", True), ("peak RSS (MiB)", "peak_rss_mib", False),
              ("step time (s)", "step_s", False), ("held-out loss", "eval_loss", False)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (title, key, log) in zip(axes, panels):
        ax.bar(names, [r[key] for r in rows], color="#4c72b0")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
        if log:
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--layers", type=int, default=None, help="keep only the first N layers (quick looks)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(ROOT / "docs" / "methods_comparison"), help="writes OUT.md, OUT.png, OUT.json")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from leantune.models.demo_model import cut_layers, demo_model_dir

    with tempfile.TemporaryDirectory() as tmp:
        model = str(demo_model_dir())
        note = "SmolLM2-135M-Instruct"
        if a.layers:
            model = str(cut_layers(model, a.layers, Path(tmp) / "cut"))
            note += f" (first {a.layers} layers)"
        rows = []
        for method in a.methods.split(","):
            rows.append(train(method, model, Path(tmp) / method, a))
            print(json.dumps(rows[-1]), flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(markdown(rows, a, note))
    out.with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, out.with_suffix(".png"))
    print(markdown(rows, a, note))


if __name__ == "__main__":
    main()
