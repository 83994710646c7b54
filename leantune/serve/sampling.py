"""Sampling: the request fields checked into a `Sampling`, and the next token picked from one row's logits."""

from __future__ import annotations

import math

import torch

from ..errors import ConfigError
from .request import Sampling


def pick_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; else softmax(logits / T) cut to the smallest top-p set, sampled with `generator`."""
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < s.top_p          # the tokens needed to reach top_p mass
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(max_tokens, temperature, top_p, stop, seed, *, cap: int) -> Sampling:
    """A Sampling from request fields, or a ConfigError naming the field (the API turns it into a 400)."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ConfigError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if max_tokens > cap:
        raise ConfigError(f"max_tokens {max_tokens} is above this server's cap ({cap}); ask for fewer "
                          "or start the server with a larger --max-tokens")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2 or math.isnan(temperature):
        raise ConfigError(f"temperature must be between 0 and 2, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ConfigError("stop must be a string or a list of at most 4 strings")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return Sampling(max_tokens, float(temperature), float(top_p), stop, seed)
