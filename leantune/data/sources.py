"""Several datasets in one run: which sources a DataConfig names, and how their examples are mixed.

    data.path: train.jsonl                      one source, used as is
    data.path: [a.jsonl, b.txt]                 several sources, each used once (concatenated)
    data.sources:                               several sources mixed by weight
      - {path: a.jsonl, weight: 3}
      - {path: b.csv, weight: 1, format: alpaca, fields: {instruction: question, output: answer}}

Weights are shares of the training mix. The mix has as many examples as the sources together
(N = n_1 + ... + n_k, counted after tokenization and the eval hold-out), and source i fills
round(N * w_i / sum(w)) of them (largest remainders, so the shares add up to N exactly):

    target_i = q * n_i + r    ->  every example of source i q times, plus r of them drawn without
                                  replacement (a source larger than its share is cut to a random subset)

The draw uses random.Random(f"mix:{seed}:{i}"), so a given seed gives the same mix on every machine
and on resume; the epoch plan then shuffles the mix (dataset.batches). The eval examples are held out
of each source before mixing, so a repeated example never lands on both sides.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from ..config import DataConfig
from ..errors import DataError


@dataclass(frozen=True)
class Source:
    """One dataset to read, with its settings resolved against the data section."""

    path: str
    format: str
    split: str
    fields: dict[str, str] = field(default_factory=dict, hash=False)
    weight: float | None = None


def sources_of(cfg: DataConfig) -> list[Source]:
    """The training sources of `cfg`, in the order they were written."""
    if cfg.sources:
        return [Source(str(s.path), s.format or cfg.format, s.split or cfg.split, dict(s.fields), s.weight)
                for s in cfg.sources]
    if cfg.path is None:
        raise DataError("data.path is not set; point it at a .jsonl/.json/.csv/.parquet/.txt file")
    paths = cfg.path if isinstance(cfg.path, list) else [cfg.path]
    return [Source(str(p), cfg.format, cfg.split) for p in paths]


def rename_fields(records: list[dict[str, Any]], fields: dict[str, str], key: str) -> list[dict[str, Any]]:
    """Records with fields renamed as `fields` says ({format field: record field})."""
    if not fields:
        return records
    missing = [src for src in fields.values() if src not in records[0]]
    if missing:
        have = ", ".join(sorted(records[0])) or "none"
        raise DataError(f"{key}.fields names {', '.join(map(repr, missing))}, which record 1 does not have "
                        f"(its fields: {have}); fix the mapping")
    sources = set(fields.values())
    out = []
    for r in records:
        renamed = {k: v for k, v in r.items() if k not in sources}
        renamed.update({target: r[src] for target, src in fields.items() if src in r})
        out.append(renamed)
    return out


def shares(sizes: list[int], weights: list[float]) -> list[int]:
    """How many examples each source fills: round(N * w_i / sum(w)) with N = sum(sizes), by largest
    remainders so the shares add up to N exactly (ties go to the earlier source)."""
    total, wsum = sum(sizes), sum(weights)
    exact = [total * w / wsum for w in weights]
    out = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in by_remainder[: total - sum(out)]:
        out[i] += 1
    return out


def mix(parts: list[list[Any]], weights: list[float] | None, seed: int) -> tuple[list[Any], list[int]]:
    """The training mix of `parts` (one list of examples per source) and how many each contributed.

    weights None: the parts concatenated. Else each part is repeated whole and/or sampled without
    replacement to its share (see the module docstring), deterministically per seed.
    """
    if weights is None:
        return [e for p in parts for e in p], [len(p) for p in parts]
    out: list[Any] = []
    targets = shares([len(p) for p in parts], weights)
    for i, (part, target) in enumerate(zip(parts, targets)):
        if not part:
            continue
        whole, rest = divmod(target, len(part))
        out += part * whole
        picked = sorted(random.Random(f"mix:{seed}:{i}").sample(range(len(part)), rest))  # keep file order
        out += [part[j] for j in picked]
    return out, targets
