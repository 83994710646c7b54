"""GaLore: Gradient Low-Rank Projection (Zhao et al. 2024, https://arxiv.org/abs/2403.03507), as an AdamW.

Full fine-tuning with Adam's state shrunk to rank r. For a 2-D weight W (m x n) with gradient G:

    every T steps (T = update_proj_gap):  U, S, V^T = svd(G)
        m >= n: Q = V^T[:r]   (r x n)     R = G Q^T    (m x r)      project on the right
        m <  n: P = U[:, :r]  (m x r)     R = P^T G    (r x n)      project on the left
    Adam in the low-rank space:  M = b1 M + (1 - b1) R,  V = b2 V + (1 - b2) R^2,
                                 N = (M / (1 - b1^t)) / (sqrt(V / (1 - b2^t)) + eps)
    back to full rank:           G~ = N Q  (or P N)
    update (decoupled decay):    W <- W (1 - lr wd) - lr * scale * G~

The moments persist across projection refreshes, as in the paper's Algorithm 2 and the authors'
galore-torch. Weights that are not 2-D Linear weights (embeddings, norms, the head) get plain AdamW.

Why not the galore-torch package: it imports and runs with our torch, but it keeps a Python projector
object in optimizer.state, which a checkpoint loaded with torch.load(weights_only=True) rejects. Here the
state is tensors only (step, moments, the projection matrix), so checkpoints resume like every other
optimizer's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def galore_param_groups(model: nn.Module, params: list[nn.Parameter], *, lr: float, weight_decay: float,
                        rank: int, update_proj_gap: int, scale: float) -> list[dict]:
    """Two groups: trainable 2-D Linear weights (projected; not the output head) and everything else."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear) and m is not head}
    projected = [p for p in params if id(p) in linear and p.ndim == 2]
    projected_ids = {id(p) for p in projected}
    rest = [p for p in params if id(p) not in projected_ids]
    common = {"lr": lr, "weight_decay": weight_decay}
    return [{"params": projected, "galore": True, "rank": rank, "update_proj_gap": update_proj_gap,
             "scale": scale, **common},
            {"params": rest, "galore": False, **common}]


def projection(grad: Tensor, rank: int) -> Tensor:
    """The top-`rank` singular vectors of `grad` on its smaller side: V^T[:r] (r x n) if m >= n, else U[:, :r]."""
    # SVD in at least fp32: torch has no bf16 SVD, and fp64 gradients keep their precision
    u, _, vh = torch.linalg.svd(grad.to(torch.promote_types(grad.dtype, torch.float32)), full_matrices=False)
    basis = vh[:rank] if grad.shape[0] >= grad.shape[1] else u[:, :rank]
    return basis.to(grad.dtype)


def project(grad: Tensor, proj: Tensor) -> Tensor:
    return grad @ proj.T if grad.shape[0] >= grad.shape[1] else proj.T @ grad  # (m, r) or (r, n)


def project_back(low: Tensor, proj: Tensor, full_shape: torch.Size) -> Tensor:
    return low @ proj if full_shape[0] >= full_shape[1] else proj @ low  # (m, n)


class GaLoreAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                                  "galore": False, "rank": 0, "update_proj_gap": 1, "scale": 1.0})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: Tensor, group: dict) -> None:
        b1, b2 = group["betas"]
        state = self.state[p]
        grad = p.grad
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
        if group["galore"]:
            if int(state["step"]) % group["update_proj_gap"] == 0:  # refresh the subspace (steps 0, T, 2T, ...)
                state["projection"] = projection(grad, group["rank"])
            grad = project(grad, state["projection"])
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(grad)
            state["exp_avg_sq"] = torch.zeros_like(grad)
        state["step"] += 1
        t = float(state["step"])
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + group["eps"])
        if group["galore"]:
            update = group["scale"] * project_back(update, state["projection"], p.shape)
        if group["weight_decay"]:
            p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.to(p.dtype), alpha=-group["lr"])
