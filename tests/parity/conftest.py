"""Parity tests run the reference libraries live; PEFT warns about tiny random models and configs it
cannot find on a hub. Those warnings say nothing about the comparisons, so they are silenced here."""

import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def greedy_by_full_forward(forward, ids, steps: int) -> list[int]:
    """Greedy decoding by definition: each new token is the argmax of a full forward over everything so far,
    with no KV cache. `forward(ids) -> logits` is the reference model's own forward (PEFT's), whose parity with
    ours is tested separately. This is the reference for `generate`: PEFT 0.21.2's own generate with virtual
    tokens goes wrong under transformers >= 5.2x (its cache carries the virtual tokens' positions wrongly:
    measured on 5.24, the tokens after the first differ from this definition), so it cannot be the reference."""
    import torch

    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(forward(ids)[0, -1].argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out
