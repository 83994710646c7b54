"""The tokenized-data cache: written once by preprocess, read back identically, never stale."""

from __future__ import annotations

import json

import pytest
from conftest import build_tokenizer
from data_helpers import alpaca, write_jsonl

from leantune.cli.main import main
from leantune.config import DataConfig, SourceConfig
from leantune.data.dataset import build


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()




def _key(p):
    return ([(e.input_ids, e.labels) for e in p.train], [(e.input_ids, e.labels) for e in p.eval])


def _cached(p):
    return any("read from the cache" in n for n in p.report.notes)


def test_preprocess_then_build_reads_the_same_examples_from_the_cache(tmp_path, tok):
    cfg = DataConfig(path=write_jsonl(tmp_path / "t.jsonl", alpaca(30)), cache_dir=str(tmp_path / "cache"))
    fresh = build(cfg, tok, seed=0)
    assert not _cached(fresh) and not (tmp_path / "cache").exists()  # a run only reads the cache
    written = build(cfg, tok, seed=0, save_cache=True)
    files = list((tmp_path / "cache").rglob("*"))
    assert [f.suffix for f in files if f.is_file()] == [".safetensors"]  # atomic: no temporary file left
    hit = build(cfg, tok, seed=0)
    assert _cached(hit) and _key(hit) == _key(written) == _key(fresh)
    assert hit.report.summary().split(" data.path (")[0] == fresh.report.summary()  # the same counts
    off = build(DataConfig(path=cfg.path, cache_dir=cfg.cache_dir, cache=False), tok, seed=0)
    assert not _cached(off)


def test_settings_applied_after_tokenization_share_one_cache(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", alpaca(20))
    b = write_jsonl(tmp_path / "b.jsonl", alpaca(12, "two"))
    cache = str(tmp_path / "cache")
    build(DataConfig(path=[a, b], cache_dir=cache), tok, seed=0, save_cache=True)
    cfg = DataConfig(sources=[SourceConfig(path=a, weight=1.0), SourceConfig(path=b, weight=2.0)], eval_fraction=0.2,
                     cache_dir=cache, packing=False)
    hit = build(cfg, tok, seed=5)
    assert all(s.cached for s in hit.report.sources)
    assert _key(hit) == _key(build(DataConfig(**{**cfg.__dict__, "cache": False}), tok, seed=5))


@pytest.mark.parametrize("change", ["file", "max_length", "train_on_prompt", "system_prompt", "tokenizer", "fields"])
def test_anything_that_changes_the_tokens_is_a_miss_never_stale(tmp_path, tok, change):
    path = tmp_path / "t.jsonl"
    write_jsonl(path, alpaca(10))
    cache = str(tmp_path / "cache")
    build(DataConfig(path=str(path), cache_dir=cache, eval_fraction=0), tok, seed=0, save_cache=True)
    cfg, tokenizer = DataConfig(path=str(path), cache_dir=cache, eval_fraction=0), tok
    if change == "file":
        write_jsonl(path, alpaca(9) + [{"instruction": "count to nine", "output": "one two three"}])
    elif change == "max_length":
        cfg.max_length = 27  # truncates the longer answers
    elif change == "train_on_prompt":
        cfg.train_on_prompt = True
    elif change == "system_prompt":
        cfg.system_prompt = "Be brief."
    elif change == "tokenizer":
        tokenizer = build_tokenizer(bos=True)
    elif change == "fields":
        cfg = DataConfig(sources=[SourceConfig(path=str(path), fields={"instruction": "instruction"})],
                         cache_dir=cache, eval_fraction=0)
    p = build(cfg, tokenizer, seed=0)
    expected = build(DataConfig(**{**cfg.__dict__, "cache": False}), tokenizer, seed=0)
    assert not _cached(p) and _key(p) == _key(expected)
    assert any("out of date" in n and "leantune preprocess" in n for n in p.report.notes)


def test_a_damaged_cache_file_is_a_miss(tmp_path, tok):
    cfg = DataConfig(path=write_jsonl(tmp_path / "t.jsonl", alpaca(8)), cache_dir=str(tmp_path / "cache"))
    build(cfg, tok, seed=0, save_cache=True)
    (f,) = (tmp_path / "cache").rglob("*.safetensors")
    f.write_bytes(f.read_bytes()[:50])
    p = build(cfg, tok, seed=0)
    assert not _cached(p) and len(p.train) + len(p.eval) == 8


def test_preprocess_command_writes_the_cache_that_train_reads(tmp_path, tiny_llama_dir, capsys):
    data = write_jsonl(tmp_path / "t.jsonl", alpaca(16))
    cache = str(tmp_path / "cache")
    assert main(["preprocess", "--model", str(tiny_llama_dir), "--data", data, "--cache-dir", cache]) == 0
    assert "cached in" in capsys.readouterr().out and list((tmp_path / "cache").rglob("*.safetensors"))
    assert main(["train", "--model", str(tiny_llama_dir), "--data.path", data, "--data.cache_dir", cache,
                 "--output_dir", str(tmp_path / "run"), "--train.max_steps", "1", "--train.progress", "false",
                 "--train.tensorboard", "false"]) == 0
    assert "tokens read from the cache" in capsys.readouterr().out
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["records_read"] == 16


def test_a_folder_as_data_is_the_readers_error_not_a_traceback(tmp_path, tok):
    from leantune.errors import DataError

    with pytest.raises(DataError, match="is a folder"):
        build(DataConfig(path=str(tmp_path), cache_dir=str(tmp_path / "cache")), tok, seed=0)
