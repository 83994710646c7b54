"""eval/compare.py scores like transformers does, and eval/held_out.py picks the run's eval split while
tokenizing only the records it scores."""

from __future__ import annotations

import copy

import torch

from leantune import config as config_mod
from leantune.data.dataset import build
from leantune.eval import held_out
from leantune.eval.compare import compare, text_batches


def test_loss_equals_transformers_own_loss_and_a_model_agrees_with_itself(tiny_llama, tiny_tokenizer):
    batches = text_batches(tiny_tokenizer, ["the capital of france is paris.", "one two three four five"])
    scores = compare(tiny_llama, tiny_llama, batches)
    with torch.no_grad():
        losses = [float(tiny_llama(**b).loss) for b in batches]            # mean over each text's tokens
    counts = [b["input_ids"].shape[1] - 1 for b in batches]
    expected = sum(loss * n for loss, n in zip(losses, counts)) / sum(counts)
    assert scores["tokens"] == sum(counts)
    assert abs(scores["loss_reference"] - expected) < 1e-5 and scores["loss_candidate"] == scores["loss_reference"]
    assert scores["kl_mean"] == 0 and scores["top1_agreement"] == 1.0


def test_a_changed_model_has_positive_kl_and_its_own_loss(tiny_llama, tiny_tokenizer):
    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        other.lm_head.weight.mul_(3.0)
    scores = compare(tiny_llama, other, text_batches(tiny_tokenizer, ["one two three four five six seven"]))
    assert scores["kl_mean"] > 1e-4 and scores["kl_max"] >= scores["kl_mean"]
    assert scores["loss_candidate"] != scores["loss_reference"]


def test_held_out_batches_are_the_eval_split_and_only_those_records_are_tokenized(tiny_llama_dir, tiny_tokenizer,
                                                                                  tmp_path, monkeypatch):
    from tests.e2e.test_train_cli import write_chat_data

    data = write_chat_data(tmp_path / "d.jsonl", n=60)
    cfg = config_mod.load(None, {"model": str(tiny_llama_dir), "data.path": str(data), "data.eval_fraction": 0.2,
                                 "train.batch_size": 2, "data.max_length": 64,
                                 "data.packing": False}, validate=False)
    split_eval = build(cfg.data, tiny_tokenizer, seed=cfg.seed).eval
    calls = []
    real = held_out.tokenize_example
    monkeypatch.setattr(held_out, "tokenize_example", lambda *a, **k: calls.append(1) or real(*a, **k))
    batches, where, tokenized = held_out.held_out_batches(cfg, tiny_tokenizer, limit=2)
    assert where == "eval split" and len(batches) == 2
    assert tokenized == len(calls) == 4 and len(split_eval) == 12   # 2 batches x 2 rows: 4 of the 60 records
    seen = {tuple(ids[ids != -100].tolist()) for b in batches for ids in b["labels"]}
    wanted = {tuple(x for x in e.labels if x != -100) for e in split_eval}
    assert seen <= wanted
