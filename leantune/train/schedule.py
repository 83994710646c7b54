"""Learning-rate schedules, as plain functions (the optimizers are in optim.py).

Linear warmup from 0 to the peak, then cosine or linear decay to 0 at the last step (the shape of
transformers' get_cosine_schedule_with_warmup / get_linear_schedule_with_warmup), or constant.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, total: int, warmup: int, kind: str) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based)."""
    if warmup > 0 and step < warmup:
        return step / warmup
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if kind == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown schedule {kind!r}")


def warmup_steps(total: int, steps: int | None, ratio: float) -> int:
    return steps if steps is not None else int(math.ceil(ratio * total))


def set_lr(optimizer, factor: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
