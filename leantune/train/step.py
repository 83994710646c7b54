"""One forward/backward of a micro-batch, and held-out evaluation.

The model runs its decoder only (`model.base_model`); the head and the loss are ours
(`ops.cross_entropy`): positions without a label never reach the head, and full-vocabulary fp32
logits never exist for the whole batch.
"""

from __future__ import annotations

import math

import torch

from ..adapters.base import prepare_inputs
from ..ops.cross_entropy import causal_lm_loss
from ..ops.transfer import to_device


def _head(model):
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise TypeError(f"{type(model).__name__} has no output embedding to compute the loss with")
    return head.weight


def _softcap(model) -> float | None:
    cap = getattr(model.config, "final_logit_softcapping", None)
    return float(cap) if cap else None


def micro_batch_loss(model, batch: dict, *, normalizer: float, chunk: int) -> tuple[torch.Tensor, int]:
    """Loss of one micro-batch divided by `normalizer` (the label tokens of the whole step).

    On CUDA the batch goes over through pinned memory without blocking the host (ops/transfer.py)."""
    device = next(model.parameters()).device
    inputs = {"input_ids": to_device(batch["input_ids"], device)}
    if batch.get("position_ids") is not None:
        # Packed rows: position_ids restart per example and there is no attention mask, so transformers
        # builds a block-diagonal mask. use_cache=False is essential: with a cache object it skips that
        # detection and packed examples attend to each other (measured: logit error 0.6).
        inputs["position_ids"] = to_device(batch["position_ids"], device)
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = to_device(batch["attention_mask"], device)
    # Labels stay where the batch was built: causal_lm_loss picks the labelled positions on the host and
    # sends only their indices, so the device never waits on a boolean mask's count (a sync per step).
    inputs["labels"] = batch["labels"]
    inputs = prepare_inputs(model, inputs)  # prompt tuning puts its virtual tokens in front here
    labels = inputs.pop("labels")
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    scale = getattr(model.config, "logit_scale", None)
    if scale:  # Cohere-style models multiply logits by a constant: fold it into the hidden state
        hidden = hidden * scale
    return causal_lm_loss(hidden, _head(model), labels, normalizer=normalizer,
                          chunk=chunk, softcap=_softcap(model))


@torch.no_grad()
def evaluate(model, batches: list[dict], *, chunk: int, limit: int | None = None) -> dict:
    """Token-weighted mean loss and perplexity over held-out batches."""
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for i, batch in enumerate(batches):
        if limit is not None and i >= limit:
            break
        n = batch["num_label_tokens"]
        if n == 0:
            continue
        loss, _ = micro_batch_loss(model, batch, normalizer=n, chunk=chunk)
        total += float(loss) * n
        tokens += n
    model.train(was_training)
    if tokens == 0:
        return {}
    mean = total / tokens
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": tokens}
