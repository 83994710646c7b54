"""Mixed-adapter batches: one forward for rows that each use a different LoRA (or none).

Every adapted Linear holds S slots of stacked factors, ranks zero-padded to the largest rank loaded
(zeros add nothing, so a rank-4 adapter in a rank-16 slot gives the rank-4 result), the scale s folded
into B when the slot is loaded:

    A: (S, R, in)    Bs: (S, R, out) = s (B)^T    g: (S, out) DoRA's m / ||W + s B A||_row (ones for LoRA)

and the batch carries one slot index per row, -1 for "no adapter". Per row b with slot i = idx[b]:

    y_b = g_i * (W x_b + Bs_i^T A_i x_b) + bias        (i = -1: y_b = W x_b + bias)

Computed over the k distinct slots the batch uses, stacked as (kR, in) and (kR, out): x @ A_k^T gives every
row's projection on every used adapter, (B, T, kR); a 0/1 column mask keeps each row's own R columns (and
none for base rows); @ Bs_k adds the deltas. Two dense GEMMs per Linear, no per-row weight copies. The
per-row gather + bmm (Punica's BGMV as vLLM's torch fallback writes it) measured up to 1.5x slower than this
at batch 8-32, 8 adapters r16 on this CPU (docs/serve.md). The -1 sentinel never indexes anything: it
selects no column of the mask, so a base row cannot read any slot -- indexing with -1 silently reads the
LAST slot, the bug vLLM fixed in PR #48421 (base rows of a mixed batch got another user's adapter).
DoRA (Liu et al. 2024, arXiv 2402.09353) fits the same shape because its column norm depends only on the
adapter, not on x: g is computed once per slot load.

Over a quantized base (QLoRA's NF4/FP4, LLM.int8: leantune/quant/) W x_b is the bitsandbytes layer's own forward,
the kernel the adapter was trained against, and W is never held in 16 bits beside it: only DoRA's g needs W
itself, dequantized for the moment of the slot load. The factors are stored in the activations' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import dequantize, is_quantized


class BatchContext:
    """The slot of each row of the batch being run; shared by every BatchedLoraLinear of a model."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None      # (B,) long, -1 = base only
        self.same: int | None = None               # all rows use this one slot (-1: all base), else None
        self.used: torch.Tensor | None = None      # (k,) the distinct slots the rows use, ascending
        self._masks: dict[tuple, torch.Tensor] = {}

    def set(self, slots: list[int], device) -> None:
        self.rows = torch.tensor(slots, device=device)
        distinct = sorted(set(slots))
        self.same = distinct[0] if len(distinct) == 1 else None
        self.used = torch.tensor([i for i in distinct if i >= 0], device=device)
        self._masks = {}

    def column_mask(self, rank: int, tokens: int, dtype) -> torch.Tensor:
        """(B*T, kR): 1 where column j*R..j*R+R-1 belongs to the row's slot used[j]; base rows all 0. Built once
        per step and shape, shared by every layer of that rank."""
        key = (rank, tokens, dtype)
        mask = self._masks.get(key)
        if mask is None:
            own = self.rows.view(-1, 1) == self.used.view(1, -1)               # (B, k); -1 matches nothing
            mask = own.to(dtype).repeat_interleave(rank, dim=1).repeat_interleave(tokens, dim=0)
            self._masks[key] = mask
        return mask


class BatchedLoraLinear(nn.Module):
    """A frozen Linear (float, or bitsandbytes 4/8-bit) plus `slots` stacked LoRA/DoRA factor sets, applied per
    row of the batch. `dtype`: the factors' dtype over a quantized base (the activations'); a float base's own."""

    def __init__(self, base_layer: nn.Linear, slots: int, ctx: BatchContext,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ctx = ctx
        self.quantized = is_quantized(base_layer)
        w = base_layer.weight
        dtype = dtype if self.quantized else w.dtype
        self.register_buffer("A", torch.zeros(slots, 0, base_layer.in_features, dtype=dtype, device=w.device))
        self.register_buffer("B", torch.zeros(slots, 0, base_layer.out_features, dtype=dtype, device=w.device))
        self.g: torch.Tensor | None = None          # (S, out), only once a DoRA adapter is loaded

    @property
    def rank(self) -> int:
        return self.A.shape[1]

    def _grow(self, rank: int) -> None:
        """Pad every slot to `rank` (zeros: the product is unchanged)."""
        extra = rank - self.rank
        if extra > 0:
            self.A = F.pad(self.A, (0, 0, 0, extra))       # (S, R, in) -> (S, R+extra, in)
            self.B = F.pad(self.B, (0, 0, 0, extra))       # (S, R, out) -> (S, R+extra, out)

    @torch.no_grad()
    def put(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float,
            magnitude: torch.Tensor | None = None) -> None:
        """Load one adapter's factors into `slot` (a=None: this adapter leaves this layer alone)."""
        self.A[slot].zero_()
        self.B[slot].zero_()
        if self.g is not None:
            self.g[slot].fill_(1.0)
        if a is None:
            return
        r = a.shape[0]
        self._grow(r)
        dtype, device = self.A.dtype, self.A.device
        self.A[slot, :r] = a.to(device, dtype)
        self.B[slot, :r] = (scaling * b.float()).t().to(device, dtype)     # (out, r) -> (r, out), scale folded in
        if magnitude is not None:
            if self.g is None:
                self.g = torch.ones(self.A.shape[0], self.base_layer.out_features, dtype=dtype, device=device)
            # DoRA: the norm of each output row of W + s B A, from the weights alone (PEFT: get_weight_norm; over
            # a quantized base, of dequant(W) as PEFT's bnb layers take it). The dequantized W is dropped here.
            w = dequantize(self.base_layer) if self.quantized else self.base_layer.weight
            merged = w.float() + scaling * (b.float() @ a.float()).to(w.device)
            self.g[slot] = (magnitude.float().to(device) / merged.norm(p=2, dim=1)).to(dtype)

    def _base(self, x2: torch.Tensor) -> torch.Tensor:
        """W x, (B*T, out): bias excluded for a float base; a quantized one's kernel adds its bias itself."""
        if self.quantized:
            return self.base_layer(x2)
        return F.linear(x2, self.base_layer.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # x: (B, T, in)
        base = self.base_layer
        ctx, rank = self.ctx, self.rank
        if ctx.rows is None or not rank or ctx.same == -1:
            return base(x) if self.quantized else F.linear(x, base.weight, base.bias)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])                         # (B*T, in): 2-D mm/addmm, no batched matmul
        y = self._base(x2)                                      # (B*T, out)
        bias = base.bias
        if self.quantized and bias is not None:
            if self.g is None:
                bias = None                                     # already in y, and no DoRA scale comes after it
            else:
                y = y - bias                                    # g scales W x + s B A x only
        if y.dtype != self.A.dtype:                             # bitsandbytes answers in its input's dtype
            y, x2 = y.to(self.A.dtype), x2.to(self.A.dtype)
        if ctx.same is not None:   # every row on one adapter: plain matmuls
            y = torch.addmm(y, x2 @ self.A[ctx.same].t(), self.B[ctx.same])
            if self.g is not None:
                y = y * self.g[ctx.same]
        else:
            k = ctx.used.numel()
            whole = k == self.A.shape[0]                      # every slot in use: views, no copy
            a = (self.A if whole else self.A[ctx.used]).reshape(k * rank, -1)      # (kR, in)
            b = (self.B if whole else self.B[ctx.used]).reshape(k * rank, -1)      # (kR, out)
            xa = (x2 @ a.t()).mul_(ctx.column_mask(rank, lead[-1], x2.dtype))    # (B*T, kR), own columns only
            y = torch.addmm(y, xa, b)                          # the expand accumulates into the base output
            if self.g is not None:
                base_row = (ctx.rows < 0).view(-1, 1)
                g = self.g[ctx.rows.clamp(min=0)].masked_fill(base_row, 1.0)     # (B, out)
                y = y * g.repeat_interleave(lead[-1], dim=0)
        if bias is not None:
            y = y + bias
        return y.view(*lead, -1).to(x.dtype)
