"""Packing: whole examples per row, and a packed batch computes exactly what the examples compute alone."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from leantune.config import DataConfig
from leantune.data.packing import collate, pack, pack_indices
from leantune.data.tokenize import IGNORE, Example, tokenize_example

QA = [("what is the capital of france?", "the capital of france is paris."),
      ("write a haiku about the sea.", "waves fold into foam, salt wind hums."),
      ("one two three", "four five six seven eight nine ten"),
      ("the quick brown fox", "jumps over the lazy dog"),
      ("a journey of a thousand miles", "begins with a single step"),
      ("count", "one")]


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    cfg = DataConfig()
    out = [tokenize_example({"prompt": q, "completion": a}, "prompt_completion", tiny_tokenizer, cfg) for q, a in QA]
    out.append(tokenize_example({"text": "one two three four five"}, "text", tiny_tokenizer, cfg))
    return out


def _synthetic(lengths):
    return [Example(list(range(1, n + 1)), [IGNORE] + list(range(2, n + 1))) for n in lengths]


def test_pack_keeps_whole_examples_and_is_deterministic():
    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(200)]
    bins = pack_indices(lengths, 64)
    assert sorted(i for b in bins for i in b) == list(range(200))  # every example exactly once
    assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
    assert bins == pack_indices(lengths, 64)
    assert len(bins) <= -(-sum(lengths) // 64) + 3  # best-fit decreasing wastes little here
    with pytest.raises(ValueError, match="max_length"):
        pack_indices([10, 65], 64)


def test_rows_restart_positions_per_example():
    rows = pack(_synthetic([3, 2, 4]), 16)
    assert len(rows) == 1
    r = rows[0]
    assert r.position_ids == [0, 1, 2, 3, 0, 1, 2, 0, 1]  # longest first
    assert [lab for lab, p in zip(r.labels, r.position_ids) if p == 0] == [IGNORE] * 3


def test_collate_packed_and_unpacked():
    rows = pack(_synthetic([5, 3, 6]), 8)  # rows [6] and [5, 3]
    b = collate(rows, pad_id=99, packing=True)
    assert set(b) == {"input_ids", "labels", "position_ids"}
    assert all(t.dtype == torch.long and t.shape == (2, 8) for t in b.values())
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 3, 4, 0, 1, 2]]
    assert b["input_ids"][0, 6:].tolist() == [99, 99] and b["labels"][0, 6:].tolist() == [IGNORE] * 2

    rows = [pack([e], 8)[0] for e in _synthetic([3, 5])]
    b = collate(rows, pad_id=99, packing=False)
    assert set(b) == {"input_ids", "labels", "attention_mask"}
    assert b["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["labels"][0, 3:].tolist() == [IGNORE, IGNORE]


def _loss_sum(logits, labels):
    # (B, T, V) predicts the next token: logits[:, t] vs labels[:, t + 1]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


@torch.no_grad()
def test_packed_loss_equals_unpacked_loss(tiny_llama, examples, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    unpacked = collate([pack([e], 256)[0] for e in examples], pad, packing=False)
    ref = _loss_sum(tiny_llama(input_ids=unpacked["input_ids"], attention_mask=unpacked["attention_mask"]).logits,
                    unpacked["labels"])

    rows = pack(examples, max_length=64)
    assert 1 < len(rows) < len(examples)  # several examples share rows, and there is padding
    packed = collate(rows, pad, packing=True)
    # use_cache=False: with a cache object transformers skips packed-sequence detection (leaks across examples)
    logits = tiny_llama(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    got = _loss_sum(logits, packed["labels"])
    assert int((packed["labels"][:, 1:] != IGNORE).sum()) == int((unpacked["labels"][:, 1:] != IGNORE).sum())
    assert abs(got.item() - ref.item()) <= 1e-5 * max(1.0, abs(ref.item())), (got.item(), ref.item())


@torch.no_grad()
def test_packed_logits_equal_each_example_alone(tiny_llama, examples, tiny_tokenizer):
    rows = pack(examples, max_length=64)
    packed = collate(rows, tiny_tokenizer.pad_token_id, packing=True)
    logits = tiny_llama(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    seen = 0
    for b, row in enumerate(rows):
        starts = [t for t, p in enumerate(row.position_ids) if p == 0] + [len(row)]
        for s, e in zip(starts, starts[1:]):
            alone = tiny_llama(input_ids=torch.tensor([row.input_ids[s:e]])).logits[0]
            torch.testing.assert_close(logits[b, s:e], alone, atol=1e-5, rtol=1e-5)
            seen += 1
    assert seen == len(examples)
