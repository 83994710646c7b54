"""One way to score a model against another: the same batches through both, the same tokens scored.

For every position t that predicts a scored token y_t (a label other than -100; every next token when a
batch has no labels), with p the reference's next-token distribution and q the candidate's:

    loss        = mean_t -log p(y_t)   and   mean_t -log q(y_t)          perplexity = exp(loss)
    KL          = mean_t sum_v p_t(v) (log p_t(v) - log q_t(v))          and its max over t
    top-1       = mean_t [argmax p_t == argmax q_t]                     greedy agreement

`leantune merge` scores the merged model against the unmerged adapter (merge_report.json), `leantune
export` the exported file read back against the model it came from (<file>.fidelity.json).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

IGNORE = -100
_INPUTS = ("input_ids", "attention_mask", "position_ids")


def text_batches(tokenizer, texts: Sequence[str]) -> list[dict]:
    """One batch per text, every next token scored (texts shorter than two tokens are dropped)."""
    out = []
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"]])   # (1, T)
        if ids.shape[1] >= 2:
            out.append({"input_ids": ids, "labels": ids})
    return out


@torch.no_grad()
def compare(reference, candidate, batches: Iterable[dict]) -> dict:
    """Scores of both models over the scored tokens of `batches` (see the module docstring).

    Returns {"tokens": 0} when no batch has a scored token."""
    nll_ref = nll_cand = kl_sum = 0.0
    kl_max, agree, tokens = 0.0, 0, 0
    for batch in batches:
        labels = batch.get("labels", batch["input_ids"])
        mask = labels[:, 1:] != IGNORE                             # (B, T-1): positions that predict a token
        if not mask.any():
            continue
        inputs = {k: batch[k] for k in _INPUTS if batch.get(k) is not None}
        target = labels[:, 1:][mask]                               # (N,)
        logp = reference(**inputs, use_cache=False).logits[:, :-1][mask].float().log_softmax(-1)  # (N, V)
        logq = candidate(**inputs, use_cache=False).logits[:, :-1][mask].float().log_softmax(-1)
        # (N,); KL >= 0, but between near-identical models fp32 rounding can make the sum a hair negative
        kl = (logp.exp() * (logp - logq)).sum(-1).clamp_min(0)
        nll_ref -= float(logp.gather(1, target[:, None]).sum())
        nll_cand -= float(logq.gather(1, target[:, None]).sum())
        kl_sum += float(kl.sum())
        kl_max = max(kl_max, float(kl.max()))
        agree += int((logp.argmax(-1) == logq.argmax(-1)).sum())
        tokens += int(mask.sum())
    if tokens == 0:
        return {"tokens": 0}
    loss_ref, loss_cand = nll_ref / tokens, nll_cand / tokens
    return {"tokens": tokens, "loss_reference": loss_ref, "loss_candidate": loss_cand,
            "perplexity_reference": _ppl(loss_ref), "perplexity_candidate": _ppl(loss_cand),
            "kl_mean": kl_sum / tokens, "kl_max": kl_max, "top1_agreement": agree / tokens}


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))
