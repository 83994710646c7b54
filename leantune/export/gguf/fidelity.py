"""The fidelity report written beside every export: how close the GGUF is to the model it came from.

Two levels:
  * per tensor: RMSE and max |error| / max |source| of the stored values, decoded with gguf's own
    dequantizers, against the source weights (after merging and the llama q/k permutation);
  * model: the GGUF loaded back through transformers' GGUF reader (it dequantizes every tensor) against
    the torch model on held-out text, scored by `eval/compare.py`: perplexity of both, greedy top-1
    agreement (the share of positions where both predict the same next token) and the logit KL.
Plus bits per weight and the file size: the seeds' (format, bits/weight, size, quality delta) table,
measured on the user's own model.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import torch

# Held-out text when the user gives none: plain English prose not drawn from any training set we ship.
DEFAULT_TEXTS = [
    "The river had carved its way through the valley for thousands of years, and the town that grew along "
    "its banks learned to read the water the way sailors read the sky.",
    "To make a good cup of tea, warm the pot first, use fresh water that has just come to the boil, and let "
    "the leaves steep for three to five minutes before pouring.",
    "In 1905 Albert Einstein published four papers that changed physics: on the photoelectric effect, on "
    "Brownian motion, on special relativity, and on the equivalence of mass and energy.",
]


def load_gguf_back(path: Path):
    """The GGUF as transformers reads it (every tensor dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def build_report(records, path: Path, quant: str, n_params: int, model_level: dict | None, seconds: float) -> dict:
    stored = sum(r.nbytes for r in records)
    weights = sum(math.prod(r.shape) for r in records)
    worst = max(records, key=lambda r: r.rmse)
    return {
        "file": path.name, "quant": quant, "file_bytes": path.stat().st_size, "parameters": n_params,
        "bits_per_weight": 8 * stored / max(weights, 1), "export_seconds": round(seconds, 2),
        "model": model_level, "worst_tensor": worst.name,
        "tensors": [asdict(r) for r in records],
    }


def model_level(scores: dict) -> dict | None:
    """The report's "model" entry from `eval.compare.compare(source model, GGUF read back, ...)`."""
    if not scores.get("tokens"):
        return None
    ref, cand = scores["perplexity_reference"], scores["perplexity_candidate"]
    return {"tokens": scores["tokens"], "perplexity_source": ref, "perplexity_gguf": cand,
            "perplexity_delta_pct": 100 * (cand / ref - 1), "top1_agreement": scores["top1_agreement"],
            "kl_mean": scores["kl_mean"]}


def format_table(report: dict) -> str:
    """A short table for the terminal: the headline numbers, then per-type totals."""
    by_type: dict[str, list] = {}
    for t in report["tensors"]:
        by_type.setdefault(t["qtype"], []).append(t)
    lines = [f"{'type':<8}{'tensors':>8}{'MB':>9}{'max rmse':>11}{'max rel err':>13}"]
    for qtype, ts in sorted(by_type.items()):
        lines.append(f"{qtype:<8}{len(ts):>8}{sum(t['nbytes'] for t in ts) / 1e6:>9.2f}"
                     f"{max(t['rmse'] for t in ts):>11.2e}{max(t['max_rel'] for t in ts):>13.2e}")
    lines.append(f"{report['file']}: {report['quant']}, {report['file_bytes'] / 1e6:.1f} MB, "
                 f"{report['bits_per_weight']:.2f} bits/weight, {report['export_seconds']:.1f} s")
    m = report.get("model")
    if m:
        lines.append(f"held-out perplexity {m['perplexity_source']:.3f} -> {m['perplexity_gguf']:.3f} "
                     f"({m['perplexity_delta_pct']:+.2f}%), greedy top-1 agreement {100 * m['top1_agreement']:.1f}% "
                     f"over {m['tokens']} tokens")
    return "\n".join(lines)
