"""What merging a QLoRA adapter cost: the merged model against the adapter it came from, on held-out data.

The unmerged model is what the run trained and evaluated: the adapter on the 4/8-bit base. The merged
model is the folder the merge wrote. Both score the same label tokens of a few held-out batches
(`eval.held_out`: only those records are tokenized) with `eval.compare`: each model's loss, and the
logit KL(unmerged || merged).

A merge onto dequant(W4) is near-lossless (the KL is rounding); onto the original 16-bit weights the
adapter meets weights it never saw, which is the silent damage reported in peft#2321 and
transformers#31293.
"""

from __future__ import annotations

import math
from pathlib import Path

from ..checkpoint.adapter_io import load_adapter
from ..config import RunConfig
from ..device import pick_dtype
from ..eval.compare import compare
from ..eval.held_out import held_out_batches
from ..models.load import load_model, load_tokenizer


def merge_cost(cfg: RunConfig, adapter_dir: Path, merged_dir: Path, *, base: str, limit: int = 4) -> dict:
    """The report of `merge_report.json`: see the module docstring."""
    dtype = pick_dtype(cfg.dtype, "cpu")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    data, where, tokenized = held_out_batches(cfg, tokenizer, limit)
    unmerged = load_model(cfg.model, dtype=dtype, device="cpu", quant=cfg.quant, trust_remote_code=cfg.trust_remote_code)
    load_adapter(unmerged, adapter_dir)
    merged = load_model(merged_dir, dtype=dtype, device="cpu", trust_remote_code=cfg.trust_remote_code)
    scores = compare(unmerged.eval(), merged.eval(), data)
    result = {"base": base, "quant_bits": cfg.quant.bits, "quant_type": cfg.quant.type if cfg.quant.bits == 4 else None,
              "data": where, "batches": len(data), "records_tokenized": tokenized, "tokens": scores["tokens"]}
    if scores["tokens"]:
        result |= {"loss_unmerged": scores["loss_reference"], "loss_merged": scores["loss_candidate"],
                   "loss_change": scores["loss_candidate"] - scores["loss_reference"], "kl_mean": scores["kl_mean"],
                   "kl_max": scores["kl_max"], "top1_agreement": scores["top1_agreement"]}
    return result


def summary(report: dict) -> str:
    if not report.get("tokens"):
        return "merge cost: no held-out label tokens to measure it on"
    ppl = {k: math.exp(min(report[k], 50.0)) for k in ("loss_unmerged", "loss_merged")}
    return (f"merge cost ({report['quant_bits']}-bit run, base {report['base']}, {report['tokens']} tokens of the "
            f"{report['data']}): loss {report['loss_unmerged']:.4f} -> {report['loss_merged']:.4f} "
            f"(ppl {ppl['loss_unmerged']:.3f} -> {ppl['loss_merged']:.3f}), logit KL mean {report['kl_mean']:.3g} "
            f"max {report['kl_max']:.3g}")
