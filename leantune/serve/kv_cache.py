"""The batch's KV cache: one transformers DynamicCache for every running row, left-padded.

Rows that joined later carry masked zero columns at the left; the attention mask (B, L) says which columns are
real tokens. Joining rows pads whichever side is shorter; rows that leave are dropped, and columns no remaining
row needs are trimmed from the left.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class BatchKV:
    """The running rows' keys and values, and their attention mask."""

    def __init__(self) -> None:
        self.cache = None
        self.mask: torch.Tensor | None = None       # (B, L) 1 = a real token

    def clear(self) -> None:
        self.cache, self.mask = None, None

    def add(self, cache, mask: torch.Tensor, *, alone: bool) -> None:
        """Append the rows of a prefill's `cache` (its `mask` left-padded) below the running ones (`alone`: none run)."""
        for layer in cache.layers:   # padded columns hold junk KV: zero it so it cannot leak (masked anyway)
            layer.keys.mul_(mask[:, None, :, None].to(layer.keys.dtype))
            layer.values.mul_(mask[:, None, :, None].to(layer.values.dtype))
        if self.cache is None or alone:
            self.cache, self.mask = cache, mask
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            for attr in ("keys", "values"):
                a, b = getattr(mine, attr), getattr(theirs, attr)              # (B, H, L, D)
                setattr(mine, attr, torch.cat([F.pad(a, (0, 0, width - old, 0)), F.pad(b, (0, 0, width - new, 0))]))
        self.mask = torch.cat([F.pad(self.mask, (width - old, 0)), F.pad(mask, (width - new, 0))])

    def keep(self, rows: list[int]) -> None:
        """Only these rows stay; KV columns no remaining row uses are trimmed from the left."""
        if not rows:
            self.clear()
            return
        index = torch.tensor(rows, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0]) if mask.any() else 0
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    def next_column(self) -> torch.Tensor:
        """Open one more column for every row (the decode step's token); (B, 1) positions of that token."""
        positions = self.mask.sum(-1, keepdim=True)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        return positions
