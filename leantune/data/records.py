"""Read training records: local .jsonl/.json/.csv/.parquet/.txt files, or a hub dataset when online.

A record is a plain dict, one per example, exactly as stored; nothing here knows about formats or
tokenizers. A .txt file is raw text: one record {"text": paragraph} per paragraph, paragraphs being
separated by blank lines (lines that are empty or only whitespace); the line breaks inside a
paragraph are kept. For one example per line, put a blank line between the lines. Every way a file can be unusable (missing, empty, a bad JSON line, a record that is not
an object, an extension we cannot read) is a `DataError` that says where and what to do.

pyarrow and datasets are imported only when a .parquet file or a hub id asks for them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any

from ..errors import DataError

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")
_FILES = "a .jsonl, .json, .csv, .parquet or .txt file"
# owner/name or name, the shape of a hub dataset id; anything else that does not exist is a missing file.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def read_records(path: str | os.PathLike, split: str = "train") -> list[dict[str, Any]]:
    """All records of `path`: a local file when it exists, else a hub dataset id (needs the network)."""
    p = Path(path).expanduser()
    if p.exists():
        return read_file(p)
    text = str(path)
    if p.suffix.lower() in EXTENSIONS or not _HUB_ID.match(text) or text.startswith((".", "~")):
        raise DataError(f"data file {text!r} does not exist; check data.path (relative paths are read "
                        f"from the config file's folder, then the working directory)")
    return read_hub(text, split)


def read_file(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        raise DataError(f"{path} is a folder; point data.path at {_FILES} inside it")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet,
               ".txt": _read_txt}
    if suffix not in readers:
        raise DataError(f"{path.name}: cannot read {suffix or 'files without an extension'}; "
                        f"convert it to {_FILES} (or rename it if it already is one)")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty; it needs at least one record")
    records = readers[suffix](path)
    if not records:
        raise DataError(f"{path} holds no records; it needs at least one")
    return records


def _check_object(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {_json_kind(record)}, not an object; each record must be "
                        f'an object such as {{"instruction": ..., "output": ...}} or {{"messages": [...]}}')
    return record


def _json_kind(value: Any) -> str:
    return {list: "list", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); re-save it as UTF-8") from None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return _parse_jsonl(_read_text(path), path)


def _parse_jsonl(text: str, path: Path) -> list[dict[str, Any]]:
    records = []
    # split on \n only: U+2028/U+2029 are legal inside JSON strings, and str.splitlines breaks on them
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path.name} line {n} is not valid JSON ({e.msg} at column {e.colno}); "
                            f"fix or remove that line") from None
        records.append(_check_object(value, f"{path.name} line {n}"))
    return records


def _read_txt(path: Path) -> list[dict[str, Any]]:
    text = _read_text(path).replace("\r\n", "\n")
    paragraphs = re.split(r"\n[ \t]*\n", text)  # a blank line (possibly holding spaces) ends a paragraph
    return [{"text": p.strip("\n").rstrip()} for p in paragraphs if p.strip()]


def _read_json(path: Path) -> list[dict[str, Any]]:
    text = _read_text(path)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # a JSON Lines file saved as .json: read it as what it is
            return _parse_jsonl(text, path)
        raise DataError(f"{path.name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                        f"fix the file there") from None
    if isinstance(value, dict):
        for key in ("data", "train"):
            if isinstance(value.get(key), list):
                value = value[key]
                break
        else:
            raise DataError(f"{path.name} holds one object with keys {sorted(value)[:8]}; a .json dataset must "
                            f'be a list of records or {{"data": [...]}} / {{"train": [...]}}')
    if not isinstance(value, list):
        raise DataError(f"{path.name} holds a JSON {_json_kind(value)}; it must be a list of record objects")
    return [_check_object(r, f"{path.name} record {i + 1}") for i, r in enumerate(value)]


def _read_csv(path: Path) -> list[dict[str, Any]]:
    text = _read_text(path)
    rows = csv.DictReader(io.StringIO(text, newline=""))  # keeps newlines inside quoted fields
    if not rows.fieldnames:
        raise DataError(f"{path} has no header row; the first line must name the columns "
                        f"(e.g. instruction,input,output)")
    # Short rows give None for the missing cells; an empty cell is "" like any other CSV tool.
    return [{k: v for k, v in row.items() if k is not None} for row in rows]


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path.name} needs pyarrow; pip install pyarrow "
                        f"(or convert the file to .jsonl)") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises ArrowInvalid & co. for damaged files
        raise DataError(f"{path.name} is not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); re-export it") from None


def _offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def read_hub(dataset_id: str, split: str) -> list[dict[str, Any]]:
    unreachable = (f"{dataset_id!r} is not a local file and the hub is unreachable (offline); "
                   f"download it first or give a local path")
    if _offline():
        raise DataError(unreachable)
    try:
        import datasets
    except ImportError:
        raise DataError(f"{dataset_id!r} is not a local file; reading hub datasets needs the datasets "
                        f"package (pip install 'leantune[hub]'), or give a local path") from None
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except FileNotFoundError:  # datasets' DatasetNotFoundError is one
        raise DataError(f"{dataset_id!r} is neither a local file nor a hub dataset; check data.path") from None
    except (ConnectionError, TimeoutError, OSError):
        raise DataError(unreachable) from None
    except ValueError as e:  # an unknown split, or a dataset that needs a config name
        raise DataError(f"hub dataset {dataset_id!r}: {_first_line(e)}; check data.split, or download the "
                        "subset you want and give a local path") from None
    except Exception as e:  # script datasets, authentication, ...: one line, no traceback
        raise DataError(f"hub dataset {dataset_id!r} could not be read ({type(e).__name__}: {_first_line(e)}); "
                        "download it and give a local path") from None
    return [dict(r) for r in ds]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__
