"""Chunked cross-entropy over the output head, without full-vocabulary fp32 logits for the batch.

A causal LM's loss needs logits = h @ W^T for every trained position: (N, V) in fp32 is the largest
tensor of a LoRA step (4 x 256 tokens x 128k vocab = 512 MiB, and autograd keeps it for backward).
Here the positions are cut into chunks of `chunk` rows; each chunk's logits live only inside the
loop. The gradient is computed in the same pass (softmax - one_hot is all backward needs), so
nothing of size V survives the forward:

    loss      = sum_i (logsumexp(z_i) - z_i[y_i]) / normalizer,      z_i = W h_i
    dL/dh_i   = (softmax(z_i) - onehot(y_i)) W / normalizer
    dL/dW     = sum_i (softmax(z_i) - onehot(y_i))^T h_i / normalizer   (only when W is trainable)

`normalizer` is the number of label tokens of the whole optimizer step (all micro-batches), so that
gradient accumulation over k micro-batches equals one batch k times larger.

Precision: the loss and every reduction accumulate in fp32. With bf16/fp16 hidden states and head the
chunk's logits stay in that dtype (as a bf16 head outputs them): z - m and exp(z - m) are each computed in
fp32 inside the op and rounded once, so no (c, V) fp32 copy is made and the probabilities go into the
gradient GEMMs without a cast (issue 17 measured the old bf16 -> fp32 -> bf16 round trip at 4-12% of a
bf16 CPU step and ~125 MiB of its peak). fp32/fp64 inputs, and softcapped logits, are computed in fp32/fp64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .transfer import to_device

IGNORE_INDEX = -100

# `train.kernels: triton` (ops/triton/patch.py) switches the chunk's softmax/NLL/gradient to one Triton pass
# (ops/triton/cross_entropy.py `ce_rows`) that writes the gradient over the chunk's logits; None: the torch ops below.
_fused_rows = None


def use_fused_rows(rows_fn=None) -> None:
    """Route each chunk's loss and gradient through `rows_fn` (ops/triton/cross_entropy.py `ce_rows`), or, with
    None, through the torch ops."""
    global _fused_rows
    _fused_rows = rows_fn


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk: int, normalizer: float,
                softcap: float | None) -> Tensor:
        # hidden: (N, H) positions that carry a label; weight: (V, H); labels: (N,)
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 in tests
        total = hidden.new_zeros((), dtype=acc)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        in_place = hidden.dtype != acc and weight.dtype == hidden.dtype and softcap is None  # bf16/fp16
        fused = _fused_rows if softcap is None and acc == torch.float32 else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk]                               # (c, H)
            y = labels[s:s + chunk]                               # (c,)
            z = h @ weight.t()                                    # (c, V): the only tensor of size V
            if fused is not None:
                # One Triton pass: per-row losses in fp32, and (softmax - onehot) / normalizer written over z.
                want = need_h or need_w
                total += fused(z, y, scale=1.0 / normalizer, grad_out=z if want else None).sum()
                if need_h:
                    grad_h[s:s + chunk] = (z @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += (z.t() @ h.to(z.dtype)).to(acc)
                continue
            if in_place:
                # bf16 logits stay bf16: max, z - m and exp each run in fp32 inside the op and round once,
                # the row sums accumulate in fp32, and the probabilities feed the gradient GEMMs as they
                # are (no fp32 copy of the chunk and no cast back for the GEMM).
                zy = z.gather(1, y[:, None]).to(acc)              # (c, 1)
                m = z.amax(dim=-1, keepdim=True)                  # (c, 1), exact in bf16
                e = torch.exp_(z.sub_(m))                         # exp(z - m): (c, V), bf16
                denom = e.sum(dim=-1, keepdim=True, dtype=acc)    # (c, 1), fp32
                m = m.to(acc)
            else:
                z = z.to(acc)
                if softcap is not None:
                    t = torch.tanh_(z.div_(softcap))
                    z = t * softcap
                zy = z.gather(1, y[:, None])                      # (c, 1)
                m = z.amax(dim=-1, keepdim=True)                  # (c, 1)
                e = torch.exp_(z.sub_(m))                         # exp(z - m), in place: (c, V)
                denom = e.sum(dim=-1, keepdim=True)               # (c, 1)
            total += (m + denom.log() - zy).sum()                 # logsumexp(z) - z_y
            if not (need_h or need_w):
                continue
            if softcap is None:
                # softmax - onehot without touching (c, V) again:
                # dL/dh = (e @ W) / denom - W[y], scaled by 1/normalizer on the small (c, H) side.
                if need_h:
                    gh = (e.to(weight.dtype) @ weight).to(acc).div_(denom)
                    gh.sub_(weight[y].to(acc)).div_(normalizer)
                    grad_h[s:s + chunk] = gh.to(hidden.dtype)
                if need_w:
                    hs = h.to(acc)
                    p = e.div_(denom)                             # softmax: (c, V), in e's dtype
                    grad_w += (p.t() @ h.to(p.dtype)).to(acc).div_(normalizer)
                    grad_w.index_add_(0, y, hs, alpha=-1.0 / normalizer)
            else:
                dz = e.div_(denom)                                # softmax: (c, V)
                dz[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                dz.mul_(1.0 - t * t).div_(normalizer)             # d(cap*tanh(x/cap))/dx
                if need_h:
                    grad_h[s:s + chunk] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
                if need_w:
                    grad_w += dz.t() @ h.to(acc)
        ctx.w_dtype = weight.dtype
        ctx.save_for_backward(grad_h if need_h else None, grad_w if need_w else None)
        return total / normalizer

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.w_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None


def chunked_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, normalizer: float | None = None,
                                 chunk: int = 1024, softcap: float | None = None) -> Tensor:
    """Sum of token cross-entropies of `hidden @ weight.T` against `labels`, divided by `normalizer`.

    hidden: (N, H) (already shifted and filtered to labelled positions), weight: (V, H), labels: (N,).
    With `normalizer=None` it is the mean over the N positions.
    """
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0 + weight.sum() * 0.0
    norm = float(normalizer if normalizer is not None else hidden.shape[0])
    return _ChunkedLinearCE.apply(hidden, weight, labels, chunk, norm, softcap)


def causal_lm_loss(hidden: Tensor, head_weight: Tensor, labels: Tensor, *, normalizer: float | None = None,
                   chunk: int = 1024, softcap: float | None = None) -> tuple[Tensor, int]:
    """Next-token loss from the final hidden states (B, T, H) and HF-aligned labels (B, T).

    Labels are aligned with input_ids (the HF convention); the shift happens here. Positions whose
    next label is -100 are dropped *before* the head, so prompt tokens cost no head compute at all.
    `labels` may stay on the host while `hidden` is on a GPU: the positions are then chosen on the host.
    Returns (loss, number of label tokens).
    """
    y = labels[:, 1:]                                  # (B, T-1): position t predicts token t+1
    keep = y != IGNORE_INDEX
    n = int(keep.sum())  # labels on the host (the train step keeps them there): no device sync
    if labels.device != hidden.device:  # gather by index, sent without blocking; no boolean mask on the device
        rows, cols = keep.nonzero(as_tuple=True)                                      # (n,), (n,)
        idx = to_device(rows * hidden.shape[1] + cols, hidden.device)                 # into (B*T) positions
        y_kept = to_device(y[rows, cols], hidden.device)                              # (n,)
        h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, idx)                 # (n, H)
    else:
        h, y_kept = hidden[:, :-1][keep], y[keep]      # (n, H), (n,)
    # In the head's dtype, labelled positions only: a 4-bit base with an fp32 `dtype` leaves the hidden states
    # fp32 while a bf16 head stays bf16 (the cast's backward returns fp32 grads).
    loss = chunked_linear_cross_entropy(h.to(head_weight.dtype), head_weight, y_kept,
                                        normalizer=normalizer if normalizer else max(n, 1), chunk=chunk,
                                        softcap=softcap)
    return loss, n
