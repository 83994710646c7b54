"""What merging a QLoRA adapter cost: the merged model against the adapter it came from, on held-out data.

The unmerged model is what the run trained and evaluated: the adapter on the 4/8-bit base. The merged
model is the folder `fold` wrote. On the same batches (the run's eval split, else its first training
batches) both score the same label tokens:

    loss   = mean_t -log q(y_t)                            for each model
    KL     = mean_t sum_v p_t(v) (log p_t(v) - log q_t(v))  p: unmerged, q: merged

A merge onto dequant(W4) is near-lossless (the KL is rounding); onto the original 16-bit weights the
adapter meets weights it never saw, which is the silent damage reported in peft#2321 and
transformers#31293.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..checkpoint.peft_format import load_adapter
from ..data.dataset import batches, build
from ..device import pick_dtype
from ..models.load import load_model, load_tokenizer

if TYPE_CHECKING:
    from ..config import RunConfig


def held_out_batches(cfg: RunConfig, tokenizer, limit: int) -> tuple[list[dict], str]:
    """Up to `limit` batches of the run's eval split (else of its training data), and which one it was."""
    prepared = build(cfg.data, tokenizer, seed=cfg.seed)
    examples, where = (prepared.eval, "eval split") if prepared.eval else (prepared.train, "training data (no eval split)")
    plan = batches(examples, cfg.train.batch_size, cfg.data.max_length, cfg.data.packing, prepared.pad_id,
                   seed=cfg.seed, epoch=0)
    return plan[:limit], where


def _inputs(batch: dict) -> dict:
    keys = ("input_ids", "attention_mask", "position_ids")
    return {k: batch[k] for k in keys if batch.get(k) is not None}


@torch.no_grad()
def compare(reference, candidate, batches: list[dict]) -> dict:
    """Token-weighted loss of both models and the mean/max KL(reference || candidate) over label tokens."""
    sums = {"loss_ref": 0.0, "loss_cand": 0.0, "kl": 0.0}
    kl_max, tokens = 0.0, 0
    for batch in batches:
        mask = batch["labels"][:, 1:] != -100                    # (B, T-1): positions that predict a label
        if not mask.any():
            continue
        target = batch["labels"][:, 1:][mask]                    # (N,)
        logp = reference(**_inputs(batch), use_cache=False).logits[:, :-1][mask].float().log_softmax(-1)  # (N, V)
        logq = candidate(**_inputs(batch), use_cache=False).logits[:, :-1][mask].float().log_softmax(-1)
        # (N,); KL >= 0, but between near-identical models fp32 rounding can make the sum a hair negative
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)
        sums["loss_ref"] -= float(logp.gather(1, target[:, None]).sum())
        sums["loss_cand"] -= float(logq.gather(1, target[:, None]).sum())
        sums["kl"] += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        tokens += int(mask.sum())
    if tokens == 0:
        return {"tokens": 0}
    return {"tokens": tokens, "loss_unmerged": sums["loss_ref"] / tokens, "loss_merged": sums["loss_cand"] / tokens,
            "loss_change": (sums["loss_cand"] - sums["loss_ref"]) / tokens, "kl_mean": sums["kl"] / tokens,
            "kl_max": kl_max}


def merge_cost(cfg: RunConfig, adapter_dir: Path, merged_dir: Path, *, base: str, limit: int = 4) -> dict:
    """The report of `merge_report.json`: see the module docstring."""
    dtype = pick_dtype(cfg.dtype, "cpu")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    data, where = held_out_batches(cfg, tokenizer, limit)
    unmerged = load_model(cfg.model, dtype=dtype, device="cpu", quant=cfg.quant, trust_remote_code=cfg.trust_remote_code)
    load_adapter(unmerged, adapter_dir)
    merged = load_model(merged_dir, dtype=dtype, device="cpu", trust_remote_code=cfg.trust_remote_code)
    result = compare(unmerged.eval(), merged.eval(), data)
    return {"base": base, "quant_bits": cfg.quant.bits, "quant_type": cfg.quant.type if cfg.quant.bits == 4 else None,
            "data": where, "batches": len(data), **result}


def summary(report: dict) -> str:
    if not report.get("tokens"):
        return "merge cost: no held-out label tokens to measure it on"
    ppl = {k: math.exp(min(report[k], 50.0)) for k in ("loss_unmerged", "loss_merged")}
    return (f"merge cost ({report['quant_bits']}-bit run, base {report['base']}, {report['tokens']} tokens of the "
            f"{report['data']}): loss {report['loss_unmerged']:.4f} -> {report['loss_merged']:.4f} "
            f"(ppl {ppl['loss_unmerged']:.3f} -> {ppl['loss_merged']:.3f}), logit KL mean {report['kl_mean']:.3g} "
            f"max {report['kl_max']:.3g}")
