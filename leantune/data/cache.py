"""The tokenized-data cache: tokenize a source once (`leantune preprocess`), read it back in every run.

One file per source, `<cache_dir>/<file name>-<hash of its path>/<key>.safetensors`, holding the
examples as three flat tensors (input_ids and labels concatenated, int32; offsets, int64, n + 1)
and the source's DataReport counts in the metadata. The key is a SHA-256 over everything that
changes the tokens:

    the bytes of the data file (a hub dataset: its records as JSON), the tokenizer (its serialized
    model, special tokens, the chat template in use), the source's format, field mapping and split,
    data.max_length, overlong, train_on_prompt and system_prompt, CACHE_VERSION, and the versions
    of transformers and tokenizers

so an edited file, another tokenizer or another setting is a miss, never a stale hit; the run then
tokenizes again and says that the cache was out of date. Settings applied after tokenization (the
eval hold-out, the mix weights, packing, the seed) are not in the key: one cache serves them all.
Files are written atomically; `preprocess` replaces the older keys of the same source.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..io.atomic import save_safetensors
from .sources import Source
from .tokenize import Example, tokenizer_info

CACHE_VERSION = 1  # bump when the pipeline's tokens change for the same inputs


def cache_root(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    base = os.environ.get("LEANTUNE_CACHE") or Path.home() / ".cache" / "leantune"
    return Path(base).expanduser() / "data"


def _digest(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def tokenizer_fingerprint(tokenizer: Any, chat_template: str | None) -> str:
    """A hash of what decides how a tokenizer turns text into ids."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())  # vocab, merges, normalizer, pre-tokenizer, post-processor
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    info = tokenizer_info(tokenizer, chat_template)
    h.update(json.dumps([tokenizer.special_tokens_map, info.bos_id, info.eos_id, info.adds_bos,
                         sorted(info.stop_ids), info.template], sort_keys=True, default=str).encode())
    return h.hexdigest()


def source_key(source: Source, cfg: DataConfig, tokenizer_fp: str, records: list[dict] | None = None) -> str:
    """The cache key of `source`; `records` stands in for the file's bytes (hub datasets)."""
    import tokenizers
    import transformers

    h = hashlib.sha256()
    settings = {"version": CACHE_VERSION, "transformers": transformers.__version__,
                "tokenizers": tokenizers.__version__, "tokenizer": tokenizer_fp,
                "format": source.format, "fields": source.fields, "split": source.split,
                "max_length": cfg.max_length, "overlong": cfg.overlong, "train_on_prompt": cfg.train_on_prompt,
                "system_prompt": cfg.system_prompt}
    h.update(json.dumps(settings, sort_keys=True).encode())
    if records is None:
        _digest(h, Path(source.path).expanduser())
    else:
        h.update(json.dumps(records, sort_keys=True, default=str).encode())
    return h.hexdigest()


def source_dir(cfg: DataConfig, source: Source) -> Path:
    where = str(Path(source.path).expanduser().resolve()) if Path(source.path).expanduser().exists() else source.path
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(source.path).name)[:60]
    return cache_root(cfg) / f"{name}-{hashlib.sha256(where.encode()).hexdigest()[:12]}"


def load(path: Path, key: str) -> tuple[list[Example], dict] | None:
    """The examples and report counts stored at `path`, or None when it is missing, unreadable or
    written under another key."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("key") != key:
                return None
            ids, labels, offsets = (f.get_tensor(n).tolist() for n in ("input_ids", "labels", "offsets"))
        report = json.loads(meta["report"])
    except Exception:  # noqa: BLE001 - a damaged file is a miss; the data is tokenized again
        return None
    examples = [Example(ids[a:b], labels[a:b]) for a, b in zip(offsets, offsets[1:])]
    return examples, report


def save(path: Path, key: str, source: Source, examples: list[Example], counts: dict) -> None:
    """Write the examples of one source atomically, then drop its older keys."""
    import torch

    offsets = [0]
    for e in examples:
        offsets.append(offsets[-1] + len(e))
    tensors = {
        "input_ids": torch.tensor([t for e in examples for t in e.input_ids], dtype=torch.int32),
        "labels": torch.tensor([t for e in examples for t in e.labels], dtype=torch.int32),
        "offsets": torch.tensor(offsets, dtype=torch.int64),
    }
    meta = {"key": key, "source": source.path, "report": json.dumps(counts)}
    save_safetensors(tensors, path, metadata=meta)
    for old in path.parent.glob("*.safetensors"):
        if old != path:
            old.unlink(missing_ok=True)
