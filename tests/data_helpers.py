"""Small data files the data-pipeline tests write (sources, mixing, the tokenized cache)."""

from __future__ import annotations

import json


def write_jsonl(path, records) -> str:
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return str(path)


def alpaca(n: int, word: str = "one") -> list[dict]:
    """n alpaca records "count to i" -> i % 5 + 1 copies of `word`."""
    return [{"instruction": f"count to {i}", "output": " ".join([word] * (i % 5 + 1))} for i in range(n)]
