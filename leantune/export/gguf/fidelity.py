"""GGUF's own part of the fidelity report (the common part, model-level scores included, is
`export/fidelity.py`):
  * per tensor: RMSE and max |error| / max |source| of the stored values, decoded with gguf's own
    dequantizers, against the source weights (after merging and the llama q/k permutation);
  * the read-back the model-level scores use: the GGUF loaded through transformers' GGUF reader (it
    dequantizes every tensor).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch


def load_gguf_back(path: Path):
    """The GGUF as transformers reads it (every tensor dequantized to float32)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def tensor_report(records) -> dict:
    """The per-tensor part, and the stored bytes that bits/weight is computed from."""
    worst = max(records, key=lambda r: r.rmse)
    return {"stored_bytes": sum(r.nbytes for r in records), "worst_tensor": worst.name,
            "tensors": [asdict(r) for r in records]}


def format_table(report: dict) -> str:
    """Per-type totals of the per-tensor part, for the terminal."""
    by_type: dict[str, list] = {}
    for t in report["tensors"]:
        by_type.setdefault(t["qtype"], []).append(t)
    lines = [f"{'type':<8}{'tensors':>8}{'MB':>9}{'max rmse':>11}{'max rel err':>13}"]
    for qtype, ts in sorted(by_type.items()):
        lines.append(f"{qtype:<8}{len(ts):>8}{sum(t['nbytes'] for t in ts) / 1e6:>9.2f}"
                     f"{max(t['rmse'] for t in ts):>11.2e}{max(t['max_rel'] for t in ts):>13.2e}")
    return "\n".join(lines)
