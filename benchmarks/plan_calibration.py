"""Calibrate `leantune plan` against measured runs and write docs/plan.md (+ docs/plan.json).

Three parts:
  1. the published measured rows: docs/memory.md / memory.json (SmolLM2-135M on the 2-core CPU, peak RSS) and
     docs/qlora.md (the same model on an H100, torch.cuda.max_memory_allocated), each against the planner's
     prediction from the model's config.json;
  2. new CPU runs (--runs): every method on the demo model cut to a few layers, trained 2 steps in its own
     process, its summary.json breakdown against the prediction per component;
  3. the seeds' VRAM table (7B full ~56 GB, LoRA ~16 GB, QLoRA ~6 GB; 70B ~560 / ~160 / ~48 GB) reproduced
     from the public configs in tests/plan_configs.

    python benchmarks/plan_calibration.py             # parts 1 and 3 (seconds)
    python benchmarks/plan_calibration.py --runs      # and part 2 (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from leantune.io.atomic import write_json, write_text  # noqa: E402
from leantune.plan import Setup, estimate, read_config, shape_of, trainable_of  # noqa: E402
from leantune.plan.devices import CUDA_OVERHEAD  # noqa: E402

MiB, GiB = 2**20, 2**30

# Measured rows as published (MiB). CPU: docs/memory.md's table (batch 2 x 128, fp32; the two rows marked *
# there are the re-measured full + checkpointing run); H100: docs/qlora.md (batch 4 x 512, bf16).
# (label, method, quant, double_quant, optimizer, checkpointing, peak, saved activations)
CPU_ROWS = [
    ("full", "full", None, True, "adamw", False, 3086, 412.0),
    ("LoRA", "lora", None, True, "adamw", False, 1360, 276.8),
    ("QLoRA nf4", "lora", 4, False, "adamw", False, 1155, 276.8),
    ("QLoRA nf4 + dq", "lora", 4, True, "adamw", False, 1127, 276.8),
    ("LoRA + 8-bit AdamW", "lora", None, True, "adamw_8bit", False, 1369, 276.8),
    ("full", "full", None, True, "adamw", True, 3040, 123.6),
    ("LoRA", "lora", None, True, "adamw", True, 1103, 15.1),
    ("QLoRA nf4", "lora", 4, False, "adamw", True, 983, 15.1),
    ("QLoRA nf4 + dq", "lora", 4, True, "adamw", True, 901, 15.1),
    ("LoRA + 8-bit AdamW", "lora", None, True, "adamw_8bit", True, 1135, 15.1),
]
# The H100 rows of the current (bf16) code path: docs/benchmarks.md "Measured: 2026-11-26" (benchmarks/bench_gpu.py:
# random-init Llama shapes, full rows, LoRA r16 all-linear over a bf16 base; peak = max_memory_allocated, GiB).
# (shape, hidden, layers, heads, kv heads, intermediate, vocab, batch, seq, label, quant, optimizer, ckpt, peak GiB)
H100_ROWS = [
    ("1.1B (TinyLlama shape)", 2048, 22, 32, 4, 5632, 32000, 8, 1024, "LoRA", None, "adamw", False, 15.9),
    ("1.1B (TinyLlama shape)", 2048, 22, 32, 4, 5632, 32000, 8, 1024, "LoRA", None, "adamw", True, 3.8),
    ("1.1B (TinyLlama shape)", 2048, 22, 32, 4, 5632, 32000, 8, 1024, "QLoRA nf4+dq, paged_adamw_8bit", 4,
     "paged_adamw_8bit", True, 2.4),
    ("3.2B (Llama-3.2-3B shape)", 3072, 28, 24, 8, 8192, 128256, 4, 1024, "LoRA", None, "adamw", False, 20.1),
    ("3.2B (Llama-3.2-3B shape)", 3072, 28, 24, 8, 8192, 128256, 4, 1024, "QLoRA nf4+dq, paged_adamw_8bit", 4,
     "paged_adamw_8bit", True, 4.3),
]

# The seeds' figures (GB as they print them) and the setting we read them at.
SEEDS = {"7B": {"full": 56, "LoRA": 16, "QLoRA": 6}, "70B": {"full": 560, "LoRA": 160, "QLoRA": 48}}
SEED_MODELS = {"7B": "Mistral-7B-v0.1", "70B": "Llama-3.1-70B"}


def err(pred: float, meas: float) -> float:
    return 100 * (pred - meas) / meas


def published_rows(demo_dir: Path) -> list[dict]:
    from transformers import AutoConfig

    config = read_config(demo_dir)
    shape = shape_of(config, "SmolLM2-135M")
    trained = {m: trainable_of(config, m) for m in ("lora", "full")}
    out = []
    base = Setup(batch=2, seq=128, dtype_bytes=4, device="cpu")
    for label, method, quant, dq, opt, ckpt, peak, acts in CPU_ROWS:
        s = replace(base, method=method, quant=quant, double_quant=dq, optimizer=opt, checkpointing=ckpt)
        e = estimate(shape, s, trained[method])  # runtime: the machine's measured process baseline for s
        out.append({"source": "CPU (2 cores), peak RSS", "model": "SmolLM2-135M, 2 x 128", "config": label,
                    "checkpointing": ckpt, "measured_peak_mib": peak, "predicted_peak_mib": round(e.peak / MiB, 1),
                    "peak_error_pct": round(err(e.peak / MiB, peak), 1), "measured_activations_mib": acts,
                    "predicted_activations_mib": round(e.activations / MiB, 1),
                    "activations_error_pct": round(err(e.activations / MiB, acts), 1), "runtime_mib": round(e.runtime / MiB)})
    for name, h, layers, heads, kv, inter, vocab, batch, seq, label, quant, opt, ckpt, peak in H100_ROWS:
        config = AutoConfig.for_model("llama", hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                                      tie_word_embeddings=False)
        shape = shape_of(config, name)
        s = Setup(method="lora", quant=quant, optimizer=opt, checkpointing=ckpt, batch=batch, seq=seq, dtype_bytes=2,
                  device="cuda")
        e = estimate(shape, s, trainable_of(config, "lora"))
        out.append({"source": "H100, max_memory_allocated", "model": f"{name}, {batch} x {seq}", "config": label,
                    "checkpointing": ckpt, "measured_peak_mib": peak * 1024, "predicted_peak_mib": round(e.peak / MiB, 1),
                    "peak_error_pct": round(err(e.peak / MiB, peak * 1024), 1), "measured_activations_mib": None,
                    "predicted_activations_mib": round(e.activations / MiB, 1), "activations_error_pct": None,
                    "runtime_mib": 0})
    return out


# ---------------------------------------------------------------------------------------------
# New CPU runs: every method, each in its own process.

RUNS = [  # (label, method, extra train flags)
    ("full", "full", []),
    ("full + GaLore", "full", ["--train.optimizer", "galore_adamw", "--galore.rank", "16"]),
    ("LoRA", "lora", []),
    ("LoRA, checkpointing", "lora", ["--train.gradient_checkpointing", "true"]),
    ("LoRA + 8-bit AdamW", "lora", ["--train.optimizer", "adamw_8bit"]),
    ("QLoRA nf4 + dq", "lora", ["--quant.bits", "4"]),
    ("DoRA", "dora", []),
    ("IA3", "ia3", []),
    ("bottleneck", "bottleneck", []),
    ("prefix", "prefix", []),
    ("prompt", "prompt", []),
]


def _setup_for(method: str, extra: list[str], batch: int, seq: int) -> Setup:
    flags = dict(zip(extra[::2], extra[1::2]))
    return Setup(method=method, batch=batch, seq=seq, dtype_bytes=4, device="cpu",
                 quant=int(flags["--quant.bits"]) if "--quant.bits" in flags else None,
                 optimizer=flags.get("--train.optimizer", "adamw"),
                 checkpointing=flags.get("--train.gradient_checkpointing") == "true",
                 galore_rank=int(flags.get("--galore.rank", 128)))


def _run_dir(label: str) -> str:
    return label.replace(" ", "_").replace(",", "").replace("+", "p")


def new_runs(demo_dir: Path, layers: int, batch: int, seq: int) -> list[dict]:
    """Train each of RUNS for 2 steps, each in its own process; return what each run measured."""
    from leantune.models.demo_model import cut_layers

    work = Path(tempfile.mkdtemp(prefix="plan-cal-"))
    model = cut_layers(demo_dir, layers, work / "model")
    data = work / "text.jsonl"
    words = "the quick brown fox jumps over the lazy dog while seven small birds sing in the tall green tree".split()
    rng = random.Random(0)
    with open(data, "w") as f:  # every example longer than seq: each row holds exactly seq tokens
        for _ in range(32):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(4 * seq))}) + "\n")
    out = []
    for label, method, extra in RUNS:
        run = work / _run_dir(label)
        cmd = [sys.executable, "-m", "leantune.cli.main", "train", "--model", str(model), "--data.path", str(data),
               "--output_dir", str(run), "--train.progress", "false", "--train.tensorboard", "false",
               "--data.max_length", str(seq), "--train.batch_size", str(batch), "--train.max_steps", "2",
               "--dtype", "fp32", "--method", method, "--train.eval_every", "0", "--data.eval_fraction", "0", "--threads", "1",
               *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if p.returncode != 0:
            print(f"{label}: failed: {p.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
            continue
        mem = json.loads((run / "summary.json").read_text())["memory"]
        out.append({"config": label, "method": method, "extra": extra, "layers": layers, "batch": batch, "seq": seq,
                    "memory": {k: v for k, v in mem.items() if k.endswith("_bytes")}})
        print(f"{label}: peak {mem['mem_peak_bytes'] / MiB:.0f} MiB", file=sys.stderr)
    return out


def predict_runs(demo_dir: Path, measured: list[dict]) -> list[dict]:
    """Each measured run against the planner's prediction for the same model and settings, per component."""
    from leantune.config import RunConfig
    from leantune.models.demo_model import cut_layers

    if not measured:
        return []
    layers = measured[0]["layers"]
    model = cut_layers(demo_dir, layers, Path(tempfile.mkdtemp(prefix="plan-cal-")) / "model")
    config = read_config(model)
    shape = shape_of(config, f"SmolLM2-135M, first {layers} layers")
    out = []
    for m in measured:
        flags = dict(zip(m["extra"][::2], m["extra"][1::2]))
        cfg = RunConfig()
        cfg.galore.rank = int(flags.get("--galore.rank", 128))
        s = _setup_for(m["method"], m["extra"], m["batch"], m["seq"])
        e = estimate(shape, s, trainable_of(config, m["method"], cfg))
        pred = {"base_weights": e.weights, "trainable": e.trainable, "gradients": e.gradients,
                "optimizer_state": e.optimizer, "activations": e.activations, "peak": e.peak}
        row = {"config": m["config"]}
        for k, v in pred.items():
            got = m["memory"][f"mem_{k}_bytes"]
            row[k] = {"measured_mib": round(got / MiB, 2), "predicted_mib": round(v / MiB, 2),
                      "error_pct": round(err(v, got), 1) if got > 1024 else None}
        out.append(row)
    return out


# ---------------------------------------------------------------------------------------------
# The seeds' table


def seeds_table(seq: int, batch: int) -> list[dict]:
    out = []
    for size, name in SEED_MODELS.items():
        config = read_config(ROOT / "tests" / "plan_configs" / f"{name}.json")
        shape = shape_of(config, name)
        trained = {m: trainable_of(config, m) for m in ("full", "lora")}
        base = Setup(batch=batch, seq=seq, dtype_bytes=2, checkpointing=True, device="cuda")
        for label, s in (("full", replace(base, method="full")), ("LoRA", replace(base, method="lora")),
                         ("QLoRA", replace(base, method="lora", quant=4))):
            e = estimate(shape, s, trained[s.method])
            e8 = estimate(shape, replace(s, optimizer="adamw_8bit"), trained[s.method])
            out.append({"size": size, "model": name, "params": shape.total_params, "config": label,
                        "seed_gb": SEEDS[size][label], "predicted_gib": round(e.peak / GiB, 1),
                        "predicted_gib_with_context": round((e.peak + CUDA_OVERHEAD) / GiB, 1),
                        "predicted_gib_8bit_adam": round(e8.peak / GiB, 1),
                        "weights_gib": round(e.weights / GiB, 1), "trainable_gib": round(e.trainable / GiB, 2),
                        "optimizer_gib": round(e.optimizer / GiB, 1), "activations_gib": round(e.activations / GiB, 2)})
    return out


def render(pub: list[dict], runs: list[dict], seeds: list[dict], seq: int, batch: int, when: str | None) -> str:
    lines = ["# `leantune plan`: how close the predictions are", "",
             "Generated by `python benchmarks/plan_calibration.py --runs` (this file is rewritten by it; the prose",
             "is in the script). The planner (`leantune/plan/`) predicts from a model's config.json alone; here",
             "each prediction is set against a measured run. Error = (predicted - measured) / measured.", "",
             "How it predicts (leantune/plan/estimate.py has the terms): the model is built on the meta device for",
             "exact parameter counts, each method is attached there through the adapter registry for its trainable",
             "tensors, and the step's peak is", "",
             "    weights + trainable + optimizer state + max(saved activations + loss chunk + recomputed layer,",
             "                                                gradients + optimizer-step temporaries)",
             "            + one dequantized weight (4/8-bit base) + runtime (CPU: the measured process baseline)", "",
             "because backward frees each layer's activations as it makes that layer's gradients. The goal the issue",
             "sets is +-10% of the measured peak on every row; where a row misses it, the reason is given below.", "",
             "## 1. The published measured rows (docs/memory.md on CPU; docs/benchmarks.md on an H100)", "",
             "The CPU rows were measured before the bf16 path landed; in fp32 (what a CPU without native bf16 runs)",
             "that path changes nothing. The H100 rows of docs/qlora.md (2026-11-22) are left out: they measured the",
             "code before the bf16 path (fp32 copies of every LoRA input, an fp32 stream over a 4-bit base), which",
             "the planner no longer models; the H100 rows here are docs/benchmarks.md's of the current code.", "",
             "| device, peak measured as | model, batch x seq | configuration | ckpt | peak measured (MiB) | predicted | error | saved activations measured | predicted | error |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in pub:
        acts = "-" if r["measured_activations_mib"] is None else r["measured_activations_mib"]
        acts_err = "-" if r["activations_error_pct"] is None else f"{r['activations_error_pct']:+.1f}%"
        lines.append(f"| {r['source']} | {r['model']} | {r['config']} | {'on' if r['checkpointing'] else 'off'} | "
                     f"{r['measured_peak_mib']:.0f} | {r['predicted_peak_mib']:.0f} | {r['peak_error_pct']:+.1f}% | {acts} | "
                     f"{r['predicted_activations_mib']} | {acts_err} |")
    worst = max(pub, key=lambda r: abs(r["peak_error_pct"]))
    within = sum(abs(r["peak_error_pct"]) <= 10 for r in pub)
    lines += ["", f"Peak within +-10% on {within} of {len(pub)} rows; the worst is {worst['config']} "
              f"({worst['source'].split(',')[0]}, checkpointing {'on' if worst['checkpointing'] else 'off'}): "
              f"{worst['peak_error_pct']:+.1f}%. CPU predictions include this machine's measured process "
              f"baseline ({min(r['runtime_mib'] for r in pub if r['runtime_mib'])} MiB; "
              f"{max(r['runtime_mib'] for r in pub)} with bitsandbytes): a fresh process that imported what a run "
              "imports and trained a 1-layer Llama for two steps (leantune/plan/devices.py process_baseline).", ""]
    lines += WHAT_THE_ROWS_SAY
    if runs:
        lines += ["", "## 2. Every method on CPU, per component (new runs)", "",
                  f"The demo model cut to its first 4 layers, batch {RUN_SETTING[0]} x {RUN_SETTING[1]} tokens (every row full), "
                  f"fp32, 2 steps, each in its own process at 1 thread (measured {when}, other jobs running); "
                  "measured = the run's summary.json. MiB, measured / predicted (error).", "",
                  "| configuration | base weights | trainable | gradients | optimizer state | saved activations | peak RSS |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in runs:
            cells = []
            for k in ("base_weights", "trainable", "gradients", "optimizer_state", "activations", "peak"):
                c = r[k]
                e = "" if c["error_pct"] is None else f" ({c['error_pct']:+.1f}%)"
                cells.append(f"{c['measured_mib']:.1f} / {c['predicted_mib']:.1f}{e}")
            lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
        lines += [""] + WHAT_THE_RUNS_SAY
    lines += ["", f"## 3. The seeds' VRAM table, reproduced from configs (batch {batch} x {seq} tokens, bf16, checkpointing on)", "",
              "| size | model (config) | configuration | seeds say | predicted peak | + CUDA context | with 8-bit AdamW | weights | optimizer | activations |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in seeds:
        lines.append(f"| {r['size']} | {r['model']} ({r['params'] / 1e9:.2f}B) | {r['config']} | ~{r['seed_gb']} GB | "
                     f"{r['predicted_gib']} GiB | {r['predicted_gib_with_context']} GiB | {r['predicted_gib_8bit_adam']} GiB | "
                     f"{r['weights_gib']} | {r['optimizer_gib']} | {r['activations_gib']} |")
    lines += [""] + SEEDS_SAY + [""] + PHASES
    return "\n".join(lines) + "\n"


RUN_SETTING = (2, 128)

WHAT_THE_ROWS_SAY = [
    "What the rows say:",
    "",
    "- **On the H100 every row is within +-7%** (-6.6% to +1.3%), with and without checkpointing, LoRA and",
    "  QLoRA, at 1.1B and 3.2B parameters.",
    "- **Weights, trainable, gradients and optimizer state are exact** wherever a run reports them (part 2 and",
    "  tests/unit/test_plan.py): they are byte counts of known tensors, including the 4-bit block statistics",
    "  (4.5 bits per weight, 4.127 with double quantization), bitsandbytes' 8-bit rules (tensors under 4096",
    "  values keep fp32 moments) and GaLore's rank-r moments and projections.",
    "- **Saved activations** follow per-layer terms read from what leantune's modules save (estimate.py's",
    "  docstring): within 1-2% in part 2 for LoRA, full, IA3 and prompt tuning. The CPU rows of part 1 are",
    "  over by 7%: that run's packed rows were not all full (15.1 MiB measured against 16.9 for full rows with",
    "  checkpointing), while the planner plans full rows.",
    "",
    "Where the peak is off by more than 10%, and why (part 4 has the measurements):",
    "",
    "- **The process baseline is measured, not read from the planner's own process.** A run's resident set",
    "  starts from the interpreter, torch and transformers, plus bitsandbytes where the run uses it (+45 MiB here",
    "  once torch's kernels are paged in, +187 MiB on a bare import), plus the code pages and thread pools torch",
    "  brings in on its first training step (+185 MiB without bitsandbytes). `leantune plan` measures that once",
    "  per machine and library versions in a fresh process (a 1-layer Llama trained two steps) and caches it in",
    "  $LEANTUNE_CACHE/plan/baseline.json. Before, it used its own RSS (349 MiB), which has imported neither",
    "  bitsandbytes nor run a step: that is most of the old QLoRA and 8-bit gap.",
    "- **CPU QLoRA: the allocator keeps bitsandbytes' temporaries.** glibc's malloc raises its mmap threshold to",
    "  the largest block freed so far (up to 32 MiB), so after the first dequantized fp32 weight is freed the",
    "  next ones come from the heap, whose freed pages stay resident and fragment: on the 30-layer demo model",
    "  (QLoRA nf4 + dq, checkpointing) step 1 grows the process by 310 MiB where the planner counts 127; with",
    "  the threshold fixed (`MALLOC_MMAP_THRESHOLD_=131072`) the same run grows by 85 MiB and peaks at 823 MiB",
    "  against 1054 (part 4). The planner models the bytes the step uses, not glibc's retention of them; the",
    "  QLoRA CPU rows that miss by more than 10% miss by this. The fixed threshold is not leantune's default:",
    "  it cost one run's step 2 from 14.8 to 9.5 tokens/s (one run each, under load; every dequantized weight",
    "  is then a fresh zeroed mapping).",
    "- **Part 1's CPU rows were measured on older code** (before the bf16 path and the chunked loss; fp32, 2",
    "  threads, other jobs running) and vary by 30-50 MiB between runs of one configuration (docs/memory.md):",
    "  the two QLoRA rows with checkpointing differ by 82 MiB for 4.5 MiB of weights.",
    "- **Full fine-tuning + GaLore on CPU, part 2: -20%**, already at step 1 (1383 MiB in metrics.jsonl against",
    "  1133 predicted; plain full fine-tuning is 1271 against 1237). GaLore's projections come from an SVD of",
    "  every weight's gradient on step 1; its workspace (and the allocator keeping it) is not a planner term.",
    "- **`train.auto_fit` on the demo model is not within 10%.** With the defaults (LoRA, micro-batch 4,",
    "  data.max_length 1024, packing) over the 32-record text of part 2, 1 thread, 2026-11-26 23:20 UTC: predicted",
    "  5848 MiB, measured 4399 (+33%; summary.json `fit`). The rows held 512 tokens, not 1024 (2048 label tokens",
    "  per step; saved activations measured 2379 MiB, the planner's for 513-token rows 2382): auto_fit plans",
    "  full rows of data.max_length. Planned at 513 tokens it would be 3474 MiB, -21%: about 900 MiB of step-1",
    "  growth at 2.4 GB of activations that no term accounts for; not yet measured phase by phase (the allocator",
    "  effect of part 4 is the first suspect).",
    "- **Step time** is FLOPs (6N per token for full fine-tuning, 4N plus 6 x adapter for a frozen base, causal",
    "  attention, one more forward with checkpointing) at 30% of the device's matmul rate: docs/benchmarks.md's",
    "  1.1B LoRA rows on the H100 (0.18 s for 8 x 1024 tokens, 0.239 s with checkpointing) are 0.26 and 0.29 of",
    "  its measured 790 TFLOP/s. Other devices and CPUs are not calibrated. 4-bit's price is given two ways: on",
    "  a CPU the measured",
    "  2-2.7x of LoRA's step (bitsandbytes dequantizes to fp32 per matmul; the planner uses 2x); on a GPU the",
    "  1.56x that docs/benchmarks.md measured for QLoRA against LoRA, both with checkpointing, on the 1.1B",
    "  shape (0.373 against 0.239 s). The bandwidth floor of the dequantization traffic would be ~1.01x: the",
    "  kernels, not the bytes, set the price. `leantune plan` prints both.",
]

WHAT_THE_RUNS_SAY = [
    "Notes on the runs: the peak is the whole process's RSS, so on a model this small most of it is the runtime",
    "(the measured process baseline); the components are what test the formulas. DoRA's saved activations in",
    "fp32 include, per adapted Linear,",
    "the in x in identity its fp32 forward forms B A through (adapters/dora.py): 4 in^2 bytes per Linear, which",
    "the planner counts for every Linear and the run shows a little less of (+23% here, on the safe side). For",
    "Llama-3.1-8B in fp32 that would be 39 GB without checkpointing; the bf16 path (a GPU) forms B A without it.",
    "Forming B A as `lora_B.weight @ lora_A.weight` in fp32 too would remove it on CPUs. Prefix tuning's",
    "activations are 11% under: its prefix keys and values pass through more of attention than the planner counts.",
]

PHASES = [
    "## 4. Where a CPU run's bytes go, phase by phase",
    "",
    "SmolLM2-135M (all 30 layers), QLoRA nf4 + dq with checkpointing, 2 x 128 tokens, fp32, 1 thread, 2 steps;",
    "RSS sampled every 2 ms inside the training process, each phase's high-water mark (MiB; measured",
    "2026-11-26 23:00 UTC with other jobs running; the probe imported peft too, ~+10 MiB over a run's imports).",
    "Right: the same run with glibc's mmap threshold fixed at 128 KiB (`MALLOC_MMAP_THRESHOLD_=131072`).",
    "",
    "| phase | RSS after, glibc default | peak in the phase | RSS after, fixed threshold | peak in the phase |",
    "|---|---:|---:|---:|---:|",
    "| imports (torch, transformers, peft, bitsandbytes) | 463 | 463 | 463 | 463 |",
    "| setup: load + quantize (weights 160.6, adapter 18.6 as counted) + data | 690 | 690 | 678 | 678 |",
    "| step 1 forward + backward | 971 | 1000 | 718 | 763 |",
    "| step 1 optimizer (state 37.3, lazily made here) | 1004 | 1004 | 757 | 775 |",
    "| step 2 forward + backward | 1009 | **1054** | 759 | **823** |",
    "| final save | 1010 | 1029 | 758 | 777 |",
    "",
    "The planner's terms for this run: weights 160.8 + adapter 18.6 + optimizer 37.3 + max(activations 18.0 +",
    "loss chunk 96.0 + one recomputed layer 9.8, gradients 18.6) + one dequantized weight 3.4 = 344 MiB above",
    "the runtime; with the measured baseline (472 MiB with bitsandbytes) 816 MiB: -0.9% against the run with the",
    "fixed threshold, -23% against glibc's default. The peak is at step 2, not step 1: the optimizer's state is",
    "made lazily in step 1's optimizer.step and is alive through step 2's backward; the planner counts it in",
    "the step's peak for that reason. The same probe for LoRA with checkpointing (no 4-bit base) shows the",
    "fp32 weights, memory-mapped from safetensors, paging in during step 1 rather than at load.",
]

SEEDS_SAY = [
    "How the seeds' figures come out, point by point (the seeds write GB; the table is in GiB, 1 GiB = 1.074 GB):",
    "",
    "- **7B full ~56 GB** is 8 bytes per parameter: 16-bit weights and gradients plus 16-bit Adam moments",
    "  (2 + 2 + 4) for 7.0B parameters. leantune does not train that way: a bf16 weight cannot take updates",
    "  smaller than its rounding step, so full fine-tuning over a bf16 base keeps fp32 master weights and fp32",
    "  moments (train/optim.py MasterWeights): 2 + 2 + 4 + 8 = 16 bytes per parameter between steps (108 GiB",
    "  for Mistral's 7.24B). The predicted peak, 162 GiB, is 24 bytes per parameter: at the optimizer step the",
    "  gradients of every tensor are upcast to fp32 at once (4 more), and torch's foreach AdamW forms all the",
    "  denominators at once (4 more; inferred from the CPU full rows of part 1, which it brings to -4..-6%).",
    "  This is a prediction for the new master-weights path, not yet measured on a GPU; upcasting and stepping",
    "  tensor by tensor (or torch's fused AdamW) would take the peak back to ~16 bytes per parameter.",
    "  8-bit AdamW: 95 GiB.",
    "- **7B LoRA ~16 GB**: the 16-bit base is 13.5 GiB (14.5 GB); with the adapter, its optimizer state and",
    "  activations at this short sequence the prediction is 14.3 GiB (15.4 GB) + the CUDA context: agrees.",
    "- **7B QLoRA ~6 GB**: the 4-bit Linear weights with double quantization are 3.3 GiB, but the embeddings and",
    "  head stay 16-bit (0.5 GiB for Mistral's 32k vocabulary; 2 GiB for Llama-3's 128k) and the norms fp32;",
    "  4.8 GiB predicted, 5.8 with the CUDA context: agrees.",
    "- **70B full ~560 GB** is again 8 bytes per parameter; the prediction is 24 bytes per parameter, as above.",
    "- **70B LoRA ~160 GB**: the 16-bit base is 131 GiB (141 GB); 135 GiB predicted (145 GB).",
    "- **70B QLoRA on one 48 GB GPU**: the 4-bit base is 36.8 GiB (2 GiB of it the 16-bit embeddings and head),",
    "  41.5 GiB predicted at 1 x 512 tokens with checkpointing, so it fits as the seeds say;",
    "  tests/e2e/test_plan_cli.py checks that `leantune plan` recommends it on a 48 GB card.",
    "- The seeds give no sequence length or batch; at 4 x 2048 tokens the same 70B QLoRA needs ~53 GiB with checkpointing",
    "  (`leantune plan tests/plan_configs/Llama-3.1-70B.json --gpu 48GB --seq 2048 --batch 4`).",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", action="store_true", help="also train every method for 2 steps on CPU (part 2)")
    ap.add_argument("--layers", type=int, default=4, help="decoder layers of the demo model kept for part 2")
    ap.add_argument("--seq", type=int, default=512, help="sequence length of the seeds' table (part 3)")
    ap.add_argument("--batch", type=int, default=1, help="micro-batch of the seeds' table (part 3)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "plan.md"))
    args = ap.parse_args()
    from leantune.models.demo_model import demo_model_dir

    demo = demo_model_dir()
    pub = published_rows(demo)
    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    if args.runs:
        measured = new_runs(demo, args.layers, *RUN_SETTING)
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    else:  # the runs measured last time, predicted again with the planner as it is now
        measured, when = previous.get("runs_measured", []), previous.get("runs_measured_at")
    runs = predict_runs(demo, measured)
    seeds = seeds_table(args.seq, args.batch)
    write_text(out, render(pub, runs, seeds, args.seq, args.batch, when))
    write_json(out.with_suffix(".json"), {"published": pub, "runs": runs, "seeds": seeds, "runs_measured": measured,
                                          "runs_measured_at": when})
    print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
