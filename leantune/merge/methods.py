"""Merge math: pure functions that combine task tensors (LoRA factors or weight deltas) into one.

Every function takes the tensors of N adapters for ONE weight (same shape), their weights, and the
method's knobs, and returns one tensor; nothing here knows about models, files or module paths, so
export and serving reuse it as is.

    weighted_sum      sum_i w_i T_i                                   (task arithmetic; w < 0 negates a task,
                                                                       Ilharco et al. 2022, https://arxiv.org/abs/2212.04089)
    magnitude_prune   sum_i w_i top_k(|T_i|, density)(T_i)
    ties              trim each T_i to its top-k magnitudes, elect a sign per entry (that of sum_i T_i over
                      the trimmed tensors), then average the weighted entries that agree with it (Yadav et
                      al. 2023, https://arxiv.org/abs/2306.01708)
    dare_linear       sum_i w_i (M_i * T_i) / density,  M_i ~ Bernoulli(density)  (Yu et al. 2023,
                      https://arxiv.org/abs/2311.03099)
    dare_ties         DARE's drop-and-rescale, then TIES' sign election and disjoint mean

LoRA-specific helpers: `concat_factors` (stack the factors: ranks add, the update is exactly
sum_i w_i s_i B_i A_i) and `svd_factors` (best rank-r factorisation of a delta, Eckart-Young).

The formulas are those of PEFT 0.21.2 (peft/utils/merge_utils.py, LoraModel.add_weighted_adapter), so a
recipe and `add_weighted_adapter` give the same weights; in particular DARE draws one
`torch.bernoulli(full_like(T, density))` per tensor, in the order it is given the tensors, from
`generator` -- PEFT draws the same from the global generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

DENSITY_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")


def _stack_weighted(tensors: Sequence[Tensor], weights: Sequence[float] | Tensor) -> Tensor:
    """(N, *shape): each task tensor times its weight."""
    stacked = torch.stack(list(tensors), dim=0)
    w = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    return stacked * w.view(-1, *([1] * (stacked.dim() - 1)))


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float] | Tensor) -> Tensor:
    """sum_i w_i T_i. A negative weight subtracts that task (task negation)."""
    return _stack_weighted(tensors, weights).sum(dim=0)


def keep_top_magnitude(tensor: Tensor, density: float) -> Tensor:
    """Zero all but the int(density * numel) entries of largest |value| (density >= 1 keeps everything)."""
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    flat = tensor.reshape(-1)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat.abs(), k=k, largest=True).indices] = 1
    return tensor * mask.view_as(tensor)


def random_drop(tensor: Tensor, density: float, generator: torch.Generator | None = None) -> Tensor:
    """DARE: keep each entry with probability `density`, rescaled by 1/density so the expectation is kept."""
    if density >= 1:
        return tensor
    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def elect_sign(stacked: Tensor) -> Tensor:
    """TIES' sign election over dim 0: True where T_i has the sign of sum_i T_i (ties go to +)."""
    majority = torch.where(stacked.sum(dim=0) >= 0, 1, -1)
    return stacked.sign() == majority


def disjoint_mean(stacked: Tensor, agree: Tensor) -> Tensor:
    """Mean over dim 0 of the entries that agree with the elected sign (0 where none does)."""
    count = agree.sum(dim=0).clamp(min=1.0)
    return (stacked * agree).sum(dim=0) / count


def magnitude_prune(tensors: Sequence[Tensor], weights: Sequence[float] | Tensor, density: float) -> Tensor:
    """sum_i w_i keep_top_magnitude(T_i, density)."""
    return weighted_sum([keep_top_magnitude(t, density) for t in tensors], weights)


def ties(tensors: Sequence[Tensor], weights: Sequence[float] | Tensor, density: float) -> Tensor:
    """TIES: trim each T_i to its top magnitudes, elect signs on the trimmed (unweighted) tensors, then the
    disjoint mean of the weighted ones. The sign is elected before weighting, as in PEFT."""
    trimmed = torch.stack([keep_top_magnitude(t, density) for t in tensors], dim=0)
    agree = elect_sign(trimmed)
    return disjoint_mean(_stack_weighted(trimmed, weights), agree)


def dare_linear(tensors: Sequence[Tensor], weights: Sequence[float] | Tensor, density: float,
                generator: torch.Generator | None = None) -> Tensor:
    """DARE then a weighted sum: sum_i w_i random_drop(T_i)."""
    return weighted_sum([random_drop(t, density, generator) for t in tensors], weights)


def dare_ties(tensors: Sequence[Tensor], weights: Sequence[float] | Tensor, density: float,
              generator: torch.Generator | None = None) -> Tensor:
    """DARE's drop-and-rescale, then TIES' sign election and disjoint mean."""
    dropped = torch.stack([random_drop(t, density, generator) for t in tensors], dim=0)
    agree = elect_sign(dropped)
    return disjoint_mean(_stack_weighted(dropped, weights), agree)


Combiner = Callable[[Sequence[Tensor], Sequence[float], float, "torch.Generator | None"], Tensor]

# One signature for the dispatch: (tensors, weights, density, generator) -> tensor.
TENSOR_METHODS: dict[str, Combiner] = {
    "linear": lambda ts, w, d, g: weighted_sum(ts, w),
    "magnitude_prune": lambda ts, w, d, g: magnitude_prune(ts, w, d),
    "ties": lambda ts, w, d, g: ties(ts, w, d),
    "dare_linear": dare_linear,
    "dare_ties": dare_ties,
}


# ---------------------------------------------------------------------------------------------
# LoRA factors


def split_weight(weight: float, scaling: float) -> tuple[float, float]:
    """(w_A, w_B) with w_A * w_B = weight * scaling, the sign on A: how a weight is shared between a
    LoRA's two factors when they are combined factor by factor (PEFT's `linear`, `ties`, `dare_*`)."""
    ws = weight * scaling
    root = math.sqrt(abs(ws))
    return math.copysign(root, ws) if ws != 0 else 0.0, root


def combine_factors(method: str, a: Sequence[Tensor], b: Sequence[Tensor], weights: Sequence[float],
                    scalings: Sequence[float], density: float = 1.0,
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Combine same-rank LoRAs factor by factor: A = f(A_i, w_A,i), B = f(B_i, w_B,i) (scaling 1 after).

    For `linear` this is (sum_i c_i A_i)-then-(sum_i |c_i| B_i), NOT sum_i w_i s_i B_i A_i: cross terms
    appear. It is PEFT's `linear`; `concat_factors` is the exact weighted sum.
    """
    fn = TENSOR_METHODS[method]
    split = [split_weight(w, s) for w, s in zip(weights, scalings)]
    new_a = fn(a, [x for x, _ in split], density, generator)  # all A draws first, then all B: PEFT's order
    new_b = fn(b, [y for _, y in split], density, generator)
    return new_a.to(a[0].dtype), new_b.to(b[0].dtype)


def concat_factors(a: Sequence[Tensor], b: Sequence[Tensor], weights: Sequence[float],
                   scalings: Sequence[float]) -> tuple[Tensor, Tensor]:
    """A = [w_1 s_1 A_1; ...; w_N s_N A_N] (sum r_i, in), B = [B_1 ... B_N] (out, sum r_i):
    B @ A = sum_i w_i s_i B_i A_i exactly, at rank sum_i r_i."""
    return (torch.cat([ai * (w * s) for ai, w, s in zip(a, weights, scalings)], dim=0),
            torch.cat(list(b), dim=1))


def svd_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """The best rank-`rank` factorisation of `delta` (out, in): A = Vh[:r] (r, in), B = U[:, :r] S[:r] (out, r).
    Rows/columns beyond the matrix's own rank are zeros, so the result always has `rank` rows."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)   # u (out, k), s (k,), vh (k, in); k = min(out, in)
    r = min(rank, s.numel())
    a, b = vh[:r], u[:, :r] * s[:r]
    if r < rank:
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
    return a, b


def pad_rank(a: Tensor, b: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Zero-pad A (r, in) and B (out, r) to `rank`: the update B @ A is unchanged."""
    extra = rank - a.shape[0]
    if extra <= 0:
        return a, b
    return (torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0),
            torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1))
