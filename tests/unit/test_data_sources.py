"""Several sources per run: plain .txt input, field mappings, per-source formats and the weighted mix."""

from __future__ import annotations

from collections import Counter

import pytest
from conftest import build_tokenizer
from data_helpers import alpaca, write_jsonl

from leantune.config import DataConfig, SourceConfig, from_dict, load
from leantune.data.dataset import build
from leantune.data.records import read_records
from leantune.data.sources import mix, shares
from leantune.data.tokenize import tokenize_example
from leantune.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()




def _ids(examples):
    return [tuple(e.input_ids) for e in examples]


def test_txt_is_one_record_per_blank_line_separated_paragraph(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first line\r\nstill the first paragraph\r\n\r\nsecond\n  \t\n\n\nthird  \n\n")
    assert read_records(path) == [{"text": "first line\nstill the first paragraph"}, {"text": "second"},
                                  {"text": "third"}]


def test_txt_trains_every_token_of_each_paragraph_as_raw_text(tmp_path, tok):
    path = tmp_path / "t.txt"
    path.write_text("the quick brown fox\n\njumps over the lazy dog\n")
    p = build(DataConfig(path=str(path), eval_fraction=0, cache=False), tok, seed=0)
    assert p.report.format == "text" and p.report.records_read == 2
    cfg = DataConfig()
    expected = [tokenize_example({"text": t}, "text", tok, cfg) for t in ("the quick brown fox", "jumps over the lazy dog")]
    assert _ids(p.train) == _ids(expected)
    assert all(e.num_trained == len(e) - 1 for e in p.train)  # all but the first token, which nothing precedes


def test_one_source_as_path_or_sources_gives_the_same_examples(tmp_path, tok):
    path = write_jsonl(tmp_path / "t.jsonl", alpaca(40))
    a = build(DataConfig(path=path, eval_fraction=0.1, cache=False), tok, seed=3)
    b = build(DataConfig(sources=[SourceConfig(path=path)], eval_fraction=0.1, cache=False), tok, seed=3)
    c = build(DataConfig(sources=[SourceConfig(path=path, weight=5.0)], eval_fraction=0.1, cache=False), tok, seed=3)
    assert _ids(a.train) == _ids(b.train) == _ids(c.train) and _ids(a.eval) == _ids(b.eval) == _ids(c.eval)
    assert a.report.sources == [] and "Sources:" not in a.report.summary()


def test_a_path_list_uses_each_source_once_and_reports_per_source_counts(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(20))
    b = tmp_path / "b.txt"
    b.write_text("\n\n".join(f"paragraph {i} one two three" for i in range(10)))
    p = build(DataConfig(path=[a, str(b)], eval_fraction=0.1, cache=False), tok, seed=0)
    r = p.report
    assert (r.format, r.records_read, len(p.train), len(p.eval)) == ("alpaca + text", 30, 27, 3)
    assert [(s.format, s.examples, s.train, s.eval) for s in r.sources] == [("alpaca", 20, 18, 2), ("text", 10, 9, 1)]
    assert "a.jsonl (alpaca): 20 examples -> 18 train, 2 eval; b.txt (text): 10 examples -> 9 train, 1 eval" in r.summary()
    assert not set(_ids(p.train)) & set(_ids(p.eval))


def test_weights_set_each_source_share_repeating_or_cutting(tmp_path, tok):
    big = write_jsonl(tmp_path / "big.jsonl", alpaca(30, "one"))
    small = write_jsonl(tmp_path / "small.jsonl", alpaca(10, "two"))
    cfg = DataConfig(sources=[SourceConfig(path=big, weight=1.0), SourceConfig(path=small, weight=3.0)],
                     eval_fraction=0, cache=False)
    p = build(cfg, tok, seed=0)
    # N = 40 examples in the mix; big fills 40 * 1/4 = 10 (a sample of its 30), small 30 (each of its 10 three times)
    assert [(s.examples, s.train) for s in p.report.sources] == [(30, 10), (10, 30)] and len(p.train) == 40
    small_ids = set(_ids(build(DataConfig(path=small, eval_fraction=0, cache=False), tok, seed=0).train))
    counts = Counter(_ids(p.train))
    assert all(counts[i] == 3 for i in small_ids)
    assert sum(1 for i in counts if i not in small_ids) == 10 and all(counts[i] == 1 for i in counts if i not in small_ids)
    assert "big.jsonl (alpaca, weight 1): 30 examples -> 10 train (a sample)" in p.report.summary()
    assert "-> 30 train (repeated)" in p.report.summary()
    assert _ids(build(cfg, tok, seed=0).train) == _ids(p.train)  # deterministic per seed
    assert _ids(build(cfg, tok, seed=1).train) != _ids(p.train)


def test_mix_shares_add_up_and_follow_the_weights():
    assert shares([30, 10], [1, 3]) == [10, 30]
    assert shares([5, 5, 5], [1, 1, 1]) == [5, 5, 5]
    assert shares([7, 0, 0], [1, 1, 1]) == [3, 2, 2]  # largest remainders, earlier source first on ties
    parts = [list(range(0, 4)), list(range(100, 103))]
    mixed, counts = mix(parts, [2.0, 5.0], seed=0)
    assert counts == [2, 5] and len(mixed) == 7
    assert sorted(Counter(x for x in mixed if x >= 100).values()) == [1, 2, 2]  # 5 = each of 3 once + 2 drawn
    assert mix(parts, None, seed=0) == (parts[0] + parts[1], [4, 3])


def test_each_source_has_its_own_format_and_field_mapping(tmp_path, tok):
    renamed = [{"question": r["instruction"], "answer": r["output"], "id": i} for i, r in enumerate(alpaca(6))]
    qa = write_jsonl(tmp_path / "qa.jsonl", renamed)
    plain = write_jsonl(tmp_path / "plain.jsonl", alpaca(6))
    cfg = DataConfig(sources=[SourceConfig(path=qa, format="alpaca", fields={"instruction": "question", "output": "answer"}),
                              SourceConfig(path=plain)], eval_fraction=0, cache=False)
    p = build(cfg, tok, seed=0)
    assert _ids(p.train[:6]) == _ids(p.train[6:])  # the renamed source reads exactly like the alpaca one
    bad = DataConfig(sources=[SourceConfig(path=qa, fields={"instruction": "prompt"})], cache=False)
    with pytest.raises(DataError, match=r"data.sources\[0\].fields names 'prompt', which record 1 does not have"):
        build(bad, tok, seed=0)


def test_errors_name_the_source(tmp_path, tok):
    good = write_jsonl(tmp_path / "g.jsonl", alpaca(3))
    empty_answers = write_jsonl(tmp_path / "e.jsonl", [{"instruction": "x", "output": ""}] * 2)
    with pytest.raises(DataError, match=r"all 2 examples of data.path\[1\] were skipped"):
        build(DataConfig(path=[good, empty_answers], cache=False), tok, seed=0)


def test_config_reads_sources_and_path_lists_relative_to_the_file(tmp_path):
    (tmp_path / "a.jsonl").write_text("{}\n")
    (tmp_path / "b.txt").write_text("x\n")
    conf = tmp_path / "run.yaml"
    conf.write_text("model: m\ndata:\n  sources:\n    - {path: a.jsonl, weight: 2}\n    - b.txt\n")
    with pytest.raises(ConfigError, match=r"data.sources\[1\] has no weight while other sources have one"):
        load(conf)
    conf.write_text("model: m\ndata:\n  sources:\n    - {path: a.jsonl, weight: 2}\n    - {path: b.txt, weight: 1}\n")
    cfg = load(conf)
    assert [(s.path, s.weight) for s in cfg.data.sources] == [(str(tmp_path / "a.jsonl"), 2.0), (str(tmp_path / "b.txt"), 1.0)]
    conf.write_text("model: m\ndata: {path: [a.jsonl, b.txt]}\n")
    assert load(conf).data.path == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.txt")]


@pytest.mark.parametrize("data,match", [
    ({"path": "a.jsonl", "sources": ["b.jsonl"]}, "data.path and data.sources are both set"),
    ({"sources": [{"path": "a", "weight": 0}]}, r"data.sources\[0\].weight must be > 0"),
    ({"sources": [{"path": "a", "wieght": 1}]}, r"unknown config key 'data.sources\[0\].wieght'; did you mean 'data.sources\[0\].weight'"),
    ({"sources": [{"weight": 1}]}, r"data.sources\[0\] has no path"),
    ({"sources": [{"path": "a", "fields": ["x"]}]}, r"data.sources\[0\].fields must be a mapping"),
])
def test_bad_source_configs_name_the_fix(data, match):
    with pytest.raises(ConfigError, match=match):
        from_dict({"model": "m", "data": data})
