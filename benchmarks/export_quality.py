"""Export quality: the seeds' quantization table, measured on SmolLM2-135M-Instruct (the demo model).

For every format leantune exports (bf16, INT8 W8A16, W8A8 and LLM.int8, GPTQ 4-bit, AWQ 4-bit, GGUF Q2_K..Q8_0;
a format or quant type not registered in this checkout is a row that says so): size on disk, bits per
weight, held-out perplexity, KL to the unquantized model, greedy top-1 agreement, quantization time and
peak RSS, each from the common fidelity report (`leantune/export/fidelity.py`), the numbers a user's
`leantune export --all` prints.

The reference is the demo model as leantune loads it (its Q4_1 GGUF dequantized to float32: the seed
tables' "fp16" row is this model, not Hugging Face's bf16 checkpoint). Held-out text: the demo
dataset's chat examples in the model's own chat template (text this instruct model never trained on)
plus the built-in prose; every next token is scored.

    nice -n 19 python -m benchmarks.export_quality [--threads 2] [--examples 64] [--json out.json]

Prints a markdown table (with date, machine and versions) for docs/export.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

ROWS = [("gguf", "BF16"), ("int8", "W8A16"), ("int8", "W8A8"), ("int8", "LLM_INT8"), ("gptq", None),
        ("awq", None), ("gguf", "Q8_0"), ("gguf", "Q6_K"), ("gguf", "Q5_K_M"), ("gguf", "Q4_K_M"), ("gguf", "Q4_0"),
        ("gguf", "Q3_K_L"), ("gguf", "Q3_K_M"), ("gguf", "Q3_K_S"), ("gguf", "Q2_K")]


def held_out_texts(tok, examples: int) -> list[str]:
    from leantune.export.fidelity import DEFAULT_TEXTS

    demo = Path(__file__).resolve().parents[1] / "leantune" / "assets" / "demo" / "train.jsonl"
    records = [json.loads(line) for line in demo.read_text(encoding="utf-8").splitlines()[:examples]]
    chats = [tok.apply_chat_template(r["messages"], tokenize=False) for r in records]
    return chats + DEFAULT_TEXTS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--examples", type=int, default=64, help="demo chat examples scored (plus 3 prose passages)")
    ap.add_argument("--only", nargs="*", help="FORMAT:QUANT rows to run (default: all)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--dither", action="store_true", help="spread each weight of the reference uniformly over its "
                    "Q4_1 bin first (the demo model is a dequantized Q4_1: requantizing its grid is not typical)")
    args = ap.parse_args()
    import torch

    from leantune.eval.compare import text_batches
    from leantune.export.base import ExportOptions, available, get
    from leantune.export.run import write_and_report
    from leantune.infer.materialize import materialize
    from leantune.models.demo_model import demo_model_dir

    torch.set_num_threads(args.threads)
    folder = demo_model_dir()
    model, tok, facts = materialize(str(folder))
    if args.dither:
        print(f"dithered {undo_q4_1_grid(model)} tensors off the Q4_1 grid")
    # the demo folder is converted from a GGUF into float32; SmolLM2's own checkpoint is bf16, which is
    # what the formats that keep embeddings and norms unquantized (INT8, GPTQ, AWQ) store them in
    facts = dataclasses.replace(facts, checkpoint_dtype="bfloat16")
    batches = text_batches(tok, held_out_texts(tok, args.examples))
    reference = CachedLogits(model)   # the source's logits once per batch, not once per format
    tokens = sum(b["input_ids"].shape[1] - 1 for b in batches)
    options = ExportOptions(name="SmolLM2-135M-Instruct", progress=False)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        order = [r for o in args.only for r in ROWS if o in (f"{r[0]}:{r[1]}", r[0])] if args.only else ROWS
        for fmt, quant in order:
            row = {"format": fmt, "quant": quant}
            rows.append(row)
            if fmt not in available():
                row["note"] = "not registered in this checkout"
                continue
            exporter = get(fmt)
            quant = row["quant"] = quant or exporter.default_quant
            if quant not in exporter.quants:
                row["note"] = f"{fmt} has no {quant} in this checkout"
                continue
            out = Path(d) / exporter.default_name("smol", quant, False)
            t0 = time.perf_counter()
            try:
                row["report"] = write_and_report(exporter, reference, tok, facts, folder, out, quant, options,
                                                 batches, f"{args.examples} demo chats + 3 prose passages")
            except Exception as e:  # a benchmark row, not a crash: the others still run
                row["note"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            row["wall_seconds"] = round(time.perf_counter() - t0, 1)
            row.get("report", {}).pop("tensors", None)
            print(json.dumps({k: v for k, v in row.items() if k != "report"} | _cells(row)), flush=True)
    print(table(rows, tokens, args.threads))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str) + "\n", encoding="utf-8")


def undo_q4_1_grid(model, seed: int = 0) -> int:
    """Add to every 2-D weight stored on a Q4_1 grid (at most 16 values per block of 32) uniform noise of
    one Q4_1 step ((max - min) / 15 of the block), centred: each weight lands anywhere in the bin Q4_1
    rounded it from, as the original bf16 weight did. Deterministic; returns how many tensors changed."""
    import torch

    g, changed = torch.Generator().manual_seed(seed), 0
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.ndim != 2 or p.shape[1] % 32:
                continue
            x = p.data.float().reshape(-1, 32)
            sample = x[:: max(1, x.shape[0] // 256)]
            if max(len(torch.unique(row)) for row in sample) > 16:
                continue  # not a Q4_1 tensor (the demo's embeddings are Q8_0)
            step = (x.amax(1, keepdim=True) - x.amin(1, keepdim=True)) / 15
            p.data.copy_((x + (torch.rand(x.shape, generator=g) - 0.5) * step).reshape(p.shape))
            changed += 1
    return changed


class CachedLogits:
    """The source model, whose forward on a batch it has seen before returns the stored output."""

    def __init__(self, model):
        self.model, self.seen = model, {}

    def __getattr__(self, name):
        return getattr(self.__dict__["model"], name)

    def __call__(self, input_ids, **kw):
        key = input_ids.numpy().tobytes()
        if key not in self.seen:
            self.seen[key] = self.model(input_ids=input_ids, **kw)
        return self.seen[key]


def _cells(row: dict) -> dict:
    r = row.get("report")
    if not r:
        return {}
    m = r.get("model") or {}
    return {"MB": round(r["file_bytes"] / 1e6, 1), "bpw": round(r["bits_per_weight"], 2),
            "ppl": m.get("perplexity_export"), "kl": m.get("kl_mean"), "top1": m.get("top1_agreement"),
            "seconds": r["export_seconds"], "peak_gib": round(r["peak_rss_bytes"] / 2**30, 2)}


def table(rows: list[dict], tokens: int, threads: int) -> str:
    import torch
    import transformers

    ref = next((r["report"]["model"]["perplexity_source"] for r in rows if (r.get("report") or {}).get("model")), None)
    head = (f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {platform.machine()} "
            f"({os.cpu_count()} CPUs visible, {threads} torch threads, shared machine), torch {torch.__version__}, "
            f"transformers {transformers.__version__}; {tokens} held-out tokens; reference perplexity "
            f"{ref:.3f}" if ref else "")
    lines = [head, "", "| format | quant | size MB | bits/weight | perplexity | Δ ppl | KL (nats/token) | top-1 agree | "
             "time s | peak RSS GiB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        c, r = _cells(row), row.get("report")
        if not r:
            lines.append(f"| {row['format']} | {row['quant'] or 'default'} | {row.get('note', '')} ||||||||")
            continue
        m = r.get("model") or {}
        lines.append(f"| {row['format']} | {row['quant']} | {c['MB']:.1f} | {c['bpw']:.2f} | "
                     + (f"{m['perplexity_export']:.3f} | {m['perplexity_delta_pct']:+.2f}% | {m['kl_mean']:.2e} | "
                        f"{100 * m['top1_agreement']:.1f}% | " if m else "- | - | - | - | ")
                     + f"{r['export_seconds']:.1f} | {c['peak_gib']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
