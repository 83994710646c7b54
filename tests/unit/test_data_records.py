"""Readers: every supported file type round-trips, and every unusable file names its fix."""

from __future__ import annotations

import json

import pytest

from leantune.data.records import read_records
from leantune.errors import DataError

RECORDS = [
    {"instruction": "name a colour", "input": "", "output": "blue"},
    {"instruction": "add", "input": "1 + 1", "output": "2"},
    {"instruction": "unicode ✓", "input": "é", "output": "ü"},
]


def _write(path, fmt, records):
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(records), encoding="utf-8")
    elif fmt == "json-data":
        path.write_text(json.dumps({"data": records}), encoding="utf-8")
    elif fmt == "csv":
        import csv

        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(records[0]))
            w.writeheader()
            w.writerows(records)
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(records), path)


@pytest.mark.parametrize("fmt,suffix", [("jsonl", ".jsonl"), ("json", ".json"), ("json-data", ".json"),
                                        ("csv", ".csv"), ("parquet", ".parquet")])
def test_reader_round_trips(tmp_path, fmt, suffix):
    path = tmp_path / f"train{suffix}"
    _write(path, fmt, RECORDS)
    assert read_records(path) == RECORDS


def test_json_with_train_key_and_jsonl_saved_as_json(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps({"train": RECORDS}))
    assert read_records(a) == RECORDS
    b = tmp_path / "b.json"  # JSON Lines under a .json name: read as what it is
    _write(b, "jsonl", RECORDS)
    assert read_records(b) == RECORDS


def test_jsonl_skips_blank_lines_and_a_bom(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n\n  \n{"text": "b"}\n')
    assert read_records(path) == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize("name,content,match", [
    ("empty.jsonl", "", "is empty"),
    ("blank.jsonl", "\n\n", "holds no records"),
    ("bad.jsonl", '{"text": "a"}\n{"text": "b"\n', "line 2 is not valid JSON"),
    ("list.jsonl", '{"text": "a"}\n["text", "b"]\n', "line 2 is a JSON list, not an object"),
    ("bad.json", '[{"text": "a"},', "not valid JSON"),
    ("scalar.json", '[{"text": "a"}, 3]', "record 2 is a JSON number, not an object"),
    ("obj.json", '{"rows": []}', 'a list of records or {"data"'),
    ("data.xml", "<a/>", "cannot read .xml"),
    ("noheader.csv", "\n", "is empty|no header"),
])
def test_unusable_files_name_the_problem(tmp_path, name, content, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=match):
        read_records(path)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist; check data.path"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a folder"):
        read_records(tmp_path)


def test_hub_id_offline_names_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="not a local file and the hub is unreachable \\(offline\\); download it"):
        read_records("someone/some-dataset")


def test_not_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(path)
