"""Unpacked batches group examples of similar length: every example once per epoch, far less padding
than a random order, and the same plan for the same seed and epoch."""

import random

from leantune.data.dataset import batches
from leantune.data.tokenize import Example


def examples(n=300, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        k = rng.randint(5, 120)
        ids = [rng.randint(10, 99) for _ in range(k)]
        out.append(Example(input_ids=ids, labels=list(ids)))
    return out


def padding_fraction(plan):
    pad = total = 0
    for b in plan:
        mask = b["attention_mask"]
        pad += int((mask == 0).sum())
        total += mask.numel()
    return pad / total


def test_every_example_once_and_little_padding():
    exs = examples()
    plan = batches(exs, batch_size=4, max_length=128, packing=False, pad_id=0, seed=1, epoch=0)
    seen = sorted(i for g in plan._groups for row in g for i in row)
    assert seen == list(range(len(exs)))
    assert padding_fraction(plan) < 0.1
    # a random order of the same examples pads far more
    rng = random.Random(0)
    order = list(range(len(exs)))
    rng.shuffle(order)
    rand_pad = tot = 0
    for s in range(0, len(order), 4):
        lens = [len(exs[i]) for i in order[s:s + 4]]
        rand_pad += sum(max(lens) - n for n in lens)
        tot += max(lens) * len(lens)
    assert rand_pad / tot > 2 * padding_fraction(plan)


def test_plan_is_deterministic_and_differs_between_epochs():
    exs = examples()
    a = batches(exs, batch_size=4, max_length=128, packing=False, pad_id=0, seed=3, epoch=0)._groups
    b = batches(exs, batch_size=4, max_length=128, packing=False, pad_id=0, seed=3, epoch=0)._groups
    c = batches(exs, batch_size=4, max_length=128, packing=False, pad_id=0, seed=3, epoch=1)._groups
    assert a == b and a != c


def test_each_batch_counts_its_real_tokens_without_padding():
    """num_tokens is what `tokens_per_s` counts: the examples' own tokens, never padded positions."""
    exs = examples(60)
    for packing in (False, True):
        plan = batches(exs, batch_size=4, max_length=256, packing=packing, pad_id=0, seed=0, epoch=0)
        assert sum(b["num_tokens"] for b in plan) == sum(len(e.input_ids) for e in exs)
        assert any(b["num_tokens"] < b["input_ids"].numel() for b in plan)  # there is padding to leave out
        for b in plan:
            if not packing:
                assert b["num_tokens"] == int(b["attention_mask"].sum())
