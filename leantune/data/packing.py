"""Packing: several whole examples per row, each attending only to itself.

A packed row is the concatenation of examples with position_ids restarting at 0 for each:

    input_ids     a1 a2 a3 b1 b2 c1 c2 c3 c4 | pad pad
    position_ids   0  1  2  0  1  0  1  2  3 |   0   1
    labels         ·  x  x  ·  x  ·  x  x  x |   ·   ·      (· = -100; an example's first token is never a target)

The model is called with these position_ids, no attention_mask and use_cache=False; transformers
then finds the segments (a position that is not previous + 1 starts a new one) and builds a
block-diagonal causal mask (masking_utils.find_packed_sequence_indices). Padding restarts at 0 too,
so it forms its own segment and never merges with the last example.

Rows are filled best-fit decreasing: longest example first, into the fullest row it still fits
(ties: the earliest row), a deterministic function of the input order. An example is never split.
Unpacked rows are single examples, right-padded, with an attention_mask.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import torch

from .tokenize import IGNORE, Example


@dataclass(slots=True)
class Row:
    """One batch row before padding: one or more whole examples."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


def pack_indices(lengths: Sequence[int], max_length: int) -> list[list[int]]:
    """Group item indices into rows of total length <= max_length (best-fit decreasing, deterministic)."""
    for i, n in enumerate(lengths):
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens > max_length {max_length}; truncate or skip "
                             f"over-long examples before packing")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row): the best fit is the first with room >= n
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, b = free.pop(k)
            bins[b].append(i)
        else:
            room, b = max_length, len(bins)
            bins.append([i])
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def join(examples: Sequence[Example]) -> Row:
    """Concatenate whole examples into one row, positions restarting at 0 for each."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for e in examples:
        ids += e.input_ids
        labels += e.labels
        pos += range(len(e))
    return Row(ids, labels, pos)


def pack(examples: Sequence[Example], max_length: int) -> list[Row]:
    """Pack whole examples into rows of at most max_length tokens (best-fit decreasing, deterministic)."""
    return [join([examples[i] for i in members])
            for members in pack_indices([len(e) for e in examples], max_length)]


def collate(rows: Sequence[Row], pad_id: int, packing: bool) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one: input_ids, labels and position_ids (packed) or attention_mask.

    Every tensor is a LongTensor (B, T). Padding has label -100; packed padding restarts its
    positions at 0 so it never joins the row's last example.
    """
    if not rows:
        raise ValueError("collate needs at least one row")
    T = max(len(r) for r in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    side = torch.zeros((B, T), dtype=torch.long)  # position_ids (packed) or attention_mask (unpacked)
    for b, r in enumerate(rows):
        n = len(r)
        input_ids[b, :n] = torch.tensor(r.input_ids, dtype=torch.long)
        labels[b, :n] = torch.tensor(r.labels, dtype=torch.long)
        if packing:
            side[b, :n] = torch.tensor(r.position_ids, dtype=torch.long)
            side[b, n:] = torch.arange(T - n, dtype=torch.long)
        else:
            side[b, :n] = 1
    key = "position_ids" if packing else "attention_mask"
    return {"input_ids": input_ids, "labels": labels, key: side}
