"""Mixed-adapter batches: one forward for rows that each use a different LoRA (or none).

Every adapted Linear holds S slots of stacked factors, ranks zero-padded to the largest rank loaded
(zeros add nothing, so a rank-4 adapter in a rank-16 slot gives the rank-4 result):

    A: (S, R, in)    B: (S, out, R)    s: (S,)    g: (S, out) DoRA's m / ||W + s B A||_row (ones for LoRA)

and the batch carries one slot index per row, -1 for "no adapter". Per row b with slot i = idx[b]:

    y_b = g_i * (W x_b + s_i B_i A_i x_b) + bias        (i = -1: y_b = W x_b + bias)

computed as gather + batched matmul -- the torch form of Punica's BGMV (arXiv 2310.18547), as vLLM's
torch fallback does. The -1 sentinel is clamped to slot 0 for the gather and its rows masked back to
the base: indexing with -1 would silently read the LAST slot, the bug vLLM fixed in PR #48421 (base rows
of a mixed batch got another user's adapter). DoRA (Liu et al. 2024, arXiv 2402.09353) fits the same
shape because its column norm depends only on the adapter, not on x: g is computed once per slot load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchContext:
    """The slot index of each row of the batch being run; shared by every BatchedLoraLinear of a model."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None      # (B,) long, -1 = base only
        self.same: int | None = None               # all rows use this one slot (a fast path), else None


class BatchedLoraLinear(nn.Module):
    """A frozen Linear plus `slots` stacked LoRA/DoRA factor sets, applied per row of the batch."""

    def __init__(self, base_layer: nn.Linear, slots: int, ctx: BatchContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ctx = ctx
        w = base_layer.weight
        self.register_buffer("A", torch.zeros(slots, 0, base_layer.in_features, dtype=w.dtype, device=w.device))
        self.register_buffer("B", torch.zeros(slots, base_layer.out_features, 0, dtype=w.dtype, device=w.device))
        self.register_buffer("s", torch.zeros(slots, dtype=w.dtype, device=w.device))
        self.g: torch.Tensor | None = None          # (S, out), only once a DoRA adapter is loaded

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def _grow(self, rank: int) -> None:
        """Pad every slot to `rank` (zeros: the product is unchanged)."""
        extra = rank - self.rank
        if extra > 0:
            self.A = F.pad(self.A, (0, 0, 0, extra))       # (S, R, in) -> (S, R+extra, in)
            self.B = F.pad(self.B, (0, extra))             # (S, out, R) -> (S, out, R+extra)

    @torch.no_grad()
    def put(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float,
            magnitude: torch.Tensor | None = None) -> None:
        """Load one adapter's factors into `slot` (a=None: this adapter leaves this layer alone)."""
        self.A[slot].zero_()
        self.B[slot].zero_()
        self.s[slot] = 0.0
        if self.g is not None:
            self.g[slot].fill_(1.0)
        if a is None:
            return
        r = a.shape[0]
        self._grow(r)
        w = self.base_layer.weight
        self.A[slot, :r] = a.to(w.dtype)
        self.B[slot, :, :r] = b.to(w.dtype)
        self.s[slot] = scaling
        if magnitude is not None:
            if self.g is None:
                self.g = torch.ones(self.A.shape[0], w.shape[0], dtype=w.dtype, device=w.device)
            # DoRA: the norm of each output row of W + s B A, from the weights alone (PEFT: get_weight_norm).
            merged = w.float() + scaling * (b.float() @ a.float())
            self.g[slot] = (magnitude.float() / merged.norm(p=2, dim=1)).to(w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # x: (B, T, in)
        base = self.base_layer
        y = F.linear(x, base.weight)                            # (B, T, out)
        rows, same = self.ctx.rows, self.ctx.same
        if rows is not None and self.rank and not (same is not None and same < 0):
            if same is not None:   # every row on one adapter: plain matmuls, no gather
                delta = (x @ self.A[same].t()) @ self.B[same].t() * self.s[same]
                y = y + delta
                if self.g is not None:
                    y = y * self.g[same]
            else:
                base_row = (rows < 0).view(-1, 1, 1)           # (B, 1, 1)
                safe = rows.clamp(min=0)                       # -1 -> 0 for the gather, masked below
                xa = torch.bmm(x, self.A[safe].transpose(1, 2))               # (B, T, R)
                delta = torch.bmm(xa, self.B[safe].transpose(1, 2))           # (B, T, out)
                delta = delta * self.s[safe].view(-1, 1, 1)
                y = y + delta.masked_fill(base_row, 0.0)
                if self.g is not None:
                    y = y * self.g[safe].unsqueeze(1).masked_fill(base_row, 1.0)
        if base.bias is not None:
            y = y + base.bias
        return y
