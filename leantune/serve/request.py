"""A request as the engine schedules it: the prompt, its adapter, how to sample, where its text goes, and the
state the engine keeps for it between steps."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Request:
    prompt: list[int]
    adapter: str | None                         # None: the base alone
    sampling: Sampling
    emit: Callable[[str, dict], None]           # ("token", {"text"}) / ("done", {"finish_reason", ...}) / ("error", ...)
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False                     # set from another thread: the client went away
    created: float = field(default_factory=time.perf_counter)
    # engine state
    tokens: list[int] = field(default_factory=list)
    sent: int = 0                               # characters of the decoded text already emitted
    generator: torch.Generator | None = None
    first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True
