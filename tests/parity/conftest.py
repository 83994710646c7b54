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


def ours_forward(model, ids, mask, labels=None):
    """Our adapted model's forward on a batch, through prepare_inputs as training calls it (virtual tokens
    widen the mask and the labels there)."""
    from leantune.adapters.base import prepare_inputs

    return model(**prepare_inputs(model, {"input_ids": ids, "attention_mask": mask, "labels": labels}))


def padded_batch(pad: int):
    """Two rows of 9 token ids (6..99, past the specials), the second left-padded by `pad`: (ids, mask)."""
    import torch

    ids = torch.randint(6, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return ids, mask
