"""build(): counts everything it skips or truncates; batches(): a deterministic plan per epoch."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tokenizer

from leantune.config import DataConfig
from leantune.data.dataset import batches, build, split
from leantune.data.tokenize import IGNORE, Example
from leantune.errors import DataError


def _jsonl(path, records):
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def _alpaca(n):
    return [{"instruction": f"count to {i}", "input": "", "output": " ".join(["one"] * (i % 5 + 1))} for i in range(n)]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def test_build_reports_counts_and_splits(tmp_path, tok):
    cfg = DataConfig(path=_jsonl(tmp_path / "t.jsonl", _alpaca(40)), eval_fraction=0.1)
    p = build(cfg, tok, seed=0)
    r = p.report
    assert (r.format, r.records_read, r.examples_kept) == ("alpaca", 40, 40)
    assert (len(p.train), len(p.eval)) == (36, 4) == (r.train_examples, r.eval_examples)
    assert r.total_tokens == sum(len(e) for e in p.train + p.eval)
    assert r.trained_tokens == sum(e.num_trained for e in p.train + p.eval)
    assert r.eos_count == 2 * 40 and r.bos_count == 0 and r.skipped == {} and r.truncated == 0
    assert p.pad_id == tok.pad_token_id
    s = r.summary()
    assert "40 records -> 40 examples (36 train, 4 eval)" in s and "\n" not in s
    again = build(cfg, tok, seed=0)
    assert [e.input_ids for e in again.eval] == [e.input_ids for e in p.eval]
    other = build(cfg, tok, seed=1)
    assert [e.input_ids for e in other.eval] != [e.input_ids for e in p.eval]


def test_split_keeps_at_least_one_eval_example():
    ex = [Example([1, i], [IGNORE, i]) for i in range(3)]
    tr, ev = split(ex, 0.05, seed=0)
    assert (len(tr), len(ev)) == (2, 1)
    assert split(ex[:1], 0.5, 0) == (ex[:1], [])
    assert split(ex, 0.0, 0) == (ex, [])
    assert len(split(ex, 0.9, 0)[0]) == 1  # train never empty


def test_eval_path(tmp_path, tok):
    cfg = DataConfig(path=_jsonl(tmp_path / "t.jsonl", _alpaca(5)),
                     eval_path=_jsonl(tmp_path / "e.jsonl", [{"text": "one two"}, {"text": "three"}]))
    p = build(cfg, tok, seed=0)
    assert (len(p.train), len(p.eval), p.report.records_read) == (5, 2, 7)


def test_skips_are_counted_never_silent(tmp_path, tok):
    records = _alpaca(4) + [{"instruction": "x", "output": ""}, {"instruction": "y", "output": "  "}]
    path = _jsonl(tmp_path / "t.jsonl", records)
    chat = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                                         {"messages": [{"role": "user", "content": "only a question"}]}])
    p = build(DataConfig(path=path, eval_fraction=0), tok, seed=0)
    assert p.report.skipped == {"empty response": 2} and len(p.train) == 4
    p = build(DataConfig(path=chat, eval_fraction=0), tok, seed=0)
    assert p.report.skipped == {"no trained tokens": 1} and len(p.train) == 1
    assert "Skipped 1: 1 no trained tokens." in p.report.summary()


def test_overlong_truncate_and_skip(tmp_path, tok):
    long_answer = " ".join(["one two three four five six seven eight nine ten"] * 6)
    records = [{"prompt": "count", "completion": long_answer}, {"prompt": "a", "completion": "b"},
               {"prompt": " ".join(["the quick brown fox"] * 20), "completion": "dog"}]
    path = _jsonl(tmp_path / "t.jsonl", records)
    p = build(DataConfig(path=path, max_length=48, eval_fraction=0), tok, seed=0)
    r = p.report
    assert r.truncated == 1 and r.skipped == {"no trained tokens left after truncation": 1}
    assert len(p.train) == 2 and max(len(e) for e in p.train) == 48
    assert r.no_trained_stop == 0  # the truncated one lost its end-of-turn, but that is what truncation does
    assert "Truncated 1 to 48 tokens" in r.summary() and "Warning" not in r.summary()
    p = build(DataConfig(path=path, max_length=48, overlong="skip", eval_fraction=0), tok, seed=0)
    assert p.report.skipped == {"longer than max_length": 2} and p.report.truncated == 0 and len(p.train) == 1


def test_all_skipped_is_an_error(tmp_path, tok):
    path = _jsonl(tmp_path / "t.jsonl", [{"messages": [{"role": "user", "content": "q"}]}] * 3)
    with pytest.raises(DataError, match="all 3 examples of data.path were skipped: 3 no trained tokens — give each example a non-empty reply"):
        build(DataConfig(path=path), tok, seed=0)


def test_missing_field_is_an_error_naming_the_record(tmp_path, tok):
    path = _jsonl(tmp_path / "t.jsonl", _alpaca(2) + [{"instruction": "x"}])
    with pytest.raises(DataError, match="record 3 has no 'output' field"):
        build(DataConfig(path=path), tok, seed=0)


def test_no_pad_token_pads_with_eos_and_reports_it(tmp_path):
    tok = build_tokenizer()
    tok.pad_token = None
    p = build(DataConfig(path=_jsonl(tmp_path / "t.jsonl", _alpaca(4))), tok, seed=0)
    assert p.pad_id == tok.eos_token_id and "no pad token" in p.report.summary()
    assert tok.pad_token is None  # untouched


def _plan_key(plan):
    return [(b["input_ids"].tolist(), b["labels"].tolist()) for b in plan]


@pytest.mark.parametrize("packing", [True, False])
def test_epoch_plan_is_deterministic_and_differs_per_epoch(tmp_path, tok, packing):
    p = build(DataConfig(path=_jsonl(tmp_path / "t.jsonl", _alpaca(30)), eval_fraction=0), tok, seed=0)
    kw = dict(batch_size=2, max_length=64, packing=packing, pad_id=p.pad_id, seed=7)
    e0, e0_again, e1 = batches(p.train, epoch=0, **kw), batches(p.train, epoch=0, **kw), batches(p.train, epoch=1, **kw)
    assert _plan_key(e0) == _plan_key(e0_again)
    assert _plan_key(e0) != _plan_key(e1)
    assert _plan_key(e0[3:]) == _plan_key(e0)[3:]  # resume at batch 3 by regenerating the plan
    side = "position_ids" if packing else "attention_mask"
    total = 0
    for b in e0:
        assert set(b) == {"input_ids", "labels", side, "num_label_tokens", "num_tokens"}
        assert all(b[k].dtype == torch.long and b[k].shape == b["input_ids"].shape for k in ("labels", side))
        assert b["input_ids"].shape[1] <= 64
        assert b["num_label_tokens"] == int((b["labels"][:, 1:] != IGNORE).sum())
        total += b["num_label_tokens"]
    # every trained token of the epoch is in the plan, once
    assert total == sum(e.num_trained for e in p.train) == e0.num_label_tokens
    if not packing:
        assert len(e0) == 15
