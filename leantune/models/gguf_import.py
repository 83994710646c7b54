"""A .gguf file as a plain HF folder: converted once, cached by the file's sha256.

The folder is `$LEANTUNE_CACHE/gguf/<sha256 of the file>/` (default `~/.cache/leantune`): config.json,
generation_config.json, model.safetensors (fp32), the tokenizer with its chat template, and
leantune-gguf.json, written last, saying where it came from. `models.load.resolve_source` sends every
.gguf source here.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from ..errors import ModelError, first_line
from ..io.atomic import atomic_dir, write_json, write_text

log = logging.getLogger(__name__)

GGUF_MARKER = "leantune-gguf.json"  # written last into a converted folder; says where it came from


def cache_root() -> Path:
    """$LEANTUNE_CACHE, else $XDG_CACHE_HOME/leantune, else ~/.cache/leantune."""
    if os.environ.get("LEANTUNE_CACHE"):
        return Path(os.environ["LEANTUNE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "leantune"


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, remembered per (path, size, mtime, inode) so a multi-GB GGUF is hashed once.

    The memo is a one-line file under <cache>/gguf/stat/, named by a hash of those four values; a
    file rewritten in place gets a new mtime and is hashed again.
    """
    st = path.stat()
    stat_key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()
    memo = cache_root() / "gguf" / "stat" / stat_key[:32]
    with contextlib.suppress(OSError):
        digest = memo.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):
        write_text(memo, digest + "\n")
    return digest


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock (POSIX flock) so parallel processes (pytest-xdist) convert a GGUF once, not twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; the atomic rename still keeps the folder whole
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def gguf_to_hf(gguf_path: str | os.PathLike) -> Path:
    """Convert a .gguf file to a plain HF folder once; return the cached folder.

    The folder is <cache>/gguf/<sha256 of the file>/: config.json, generation_config.json,
    model.safetensors (fp32), the tokenizer with its chat template, and leantune-gguf.json (source
    name, size, sha256, transformers version). It is written through atomic_dir, so it either
    exists whole or not at all.

    Weights stay fp32: dequantized k-quant/Q4 values are fp16 scale * int (+ fp16 min), exact in
    fp32 but not in bf16; rounding them to bf16 would quantize the model a second time. Loading in
    bf16 later rounds them anyway, at no cost to the fp32 path.
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file {str(path)!r} does not exist; check the path (model: path/to/model.gguf)")
    digest = file_sha256(path)
    root = cache_root() / "gguf"
    out = root / digest
    if (out / GGUF_MARKER).is_file():
        return out
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK):
        raise ModelError(f"cannot write the GGUF cache {str(root)!r}; set LEANTUNE_CACHE to a writable folder")
    with _file_lock(root / f"{digest}.lock"):
        if (out / GGUF_MARKER).is_file():  # another process finished it while we waited
            return out
        for stale in root.glob(f".{digest}.*.tmp"):  # a killed conversion's leftovers; the lock says none is live
            shutil.rmtree(stale, ignore_errors=True)
        log.warning("converting %s (%.0f MB) to an HF folder once; dequantizing takes ~40 s per 100 MB on 2 CPU "
                    "cores -> %s", path.name, path.stat().st_size / 1e6, out)
        t0 = time.perf_counter()
        with atomic_dir(out) as tmp:
            _convert_gguf(path, tmp)
            write_json(tmp / GGUF_MARKER, _gguf_provenance(path, digest, time.perf_counter() - t0))
    return out


def _gguf_provenance(path: Path, digest: str, seconds: float) -> dict:
    import transformers

    return {"source_name": path.name, "source_path": str(path.resolve()), "size": path.stat().st_size,
            "sha256": digest, "weights_dtype": "float32", "transformers": transformers.__version__,
            "convert_seconds": round(seconds, 1)}


def _convert_gguf(path: Path, out: Path) -> None:
    """transformers dequantizes the GGUF; its model refuses save_pretrained (it carries a gguf
    quantization_config), so the weights move into a clean model of the same class and that one is saved."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as e:  # a damaged file fails anywhere in transformers' reader (struct.error, size mismatches)
        kind = type(e).__name__ if type(e).__name__ != "error" else f"{type(e).__module__}.error"  # struct.error
        raise ModelError(f"cannot read GGUF {str(path)!r}: {kind}: {first_line(e)[:200]}. A damaged or "
                         "truncated file (compare its size and sha256 with the source), or an architecture transformers "
                         "does not read (it reads llama, mistral, qwen2/3, gemma2/3, phi3 and a few more; convert "
                         "others with llama.cpp's tools)") from None

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(loaded).__name__]
    config.dtype = torch.float32
    with no_init_weights():  # every weight is overwritten next; skip the 4 s random init
        clean = type(loaded)(config)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(clean, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise ModelError(f"GGUF {path.name}: the dequantized weights do not fit {type(loaded).__name__} "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    clean.tie_weights()
    clean.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    clean.save_pretrained(out)
    if getattr(config, "max_position_embeddings", None):  # the GGUF's context length, not transformers' 1e30 default
        tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    _portable_tokenizer_class(out)


def _portable_tokenizer_class(folder: Path) -> None:
    """transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x cannot read;
    "PreTrainedTokenizerFast" loads the same tokenizer.json in both."""
    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_json(cfg_path, cfg)
