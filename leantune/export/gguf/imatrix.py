"""Importance matrix for the k-quants: per input column of every Linear, the mean of x^2 over calibration
text, as llama.cpp's `llama-imatrix` collects it and `llama-quantize --imatrix` uses it.

For a weight W (out, in) the output error of a quantized row is sum_j (W_ij - Q_ij) x_j, whose expected
square over the data is ~ sum_j (W_ij - Q_ij)^2 E[x_j^2] when the inputs are roughly uncorrelated; so
E[x_j^2] (one number per column) is the weight each column's error gets in the scale/min search
(kquants.py). Collected with forward hooks on the torch model, every token of every text counted once,
texts in file order (deterministic: the same file and model give the same matrix).

Default (`resolve`): for the k-quant file types of <= 4 bits (Q2_K, Q3_K_S/M/L, Q4_K_M) an export
from a run collects the matrix over a deterministic slice of the run's own training data (or of
--calibration FILE): export/calibration.py's rows, --calibration-samples x --calibration-seq tokens
(16 x 128 by default), the count printed and recorded in the report. A plain model folder has no
training data (or a run whose data cannot be read): no matrix, said once. `--imatrix none` turns the default off; `--imatrix DATA` picks the data.

Calibration text (--imatrix DATA): a file of records in any data format leantune trains on (JSON Lines, JSON, CSV,
Parquet, .txt; text, chat, alpaca, prompt/completion): each record rendered with the tokenizer's chat
template when it has one (as training sees it), then cut to `seq_len` tokens, up to `max_texts` records.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

from ...checkpoint.run_folder import run_folder_of
from ...data.formats import SkipExample, detect_format, normalize
from ...data.records import read_records
from ...errors import DataError, LeantuneError
from ..calibration import DEFAULT_SAMPLES, DEFAULT_SEQ, calibration_rows
from .writer import gguf_name

# the file types whose k-quant tensors get a calibration imatrix by default (<= 4 bits a weight)
DEFAULT_QUANTS = frozenset({"Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_M"})


def calibration_texts(path: str | Path, tokenizer, max_texts: int = 128) -> list[str]:
    """The first `max_texts` records of `path` as the model would read them."""
    records = read_records(str(path))
    if not records:
        raise DataError(f"--imatrix {path}: the file has no records; give calibration text (e.g. the training data)")
    fmt = detect_format(records)
    texts = []
    for i, record in enumerate(records[:max_texts]):
        try:
            sample = normalize(record, fmt, i)
        except SkipExample:
            continue
        if sample.text is not None:
            texts.append(sample.text)
        elif getattr(tokenizer, "chat_template", None):
            texts.append(tokenizer.apply_chat_template(sample.messages, tokenize=False))
        else:
            texts.append("\n".join(m["content"] for m in sample.messages))
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise DataError(f"--imatrix {path}: no record has text; give calibration text (e.g. the training data)")
    return texts


def collect(model, tokenizer, texts: list[str], seq_len: int = 512) -> tuple[dict[str, np.ndarray], int]:
    """{gguf tensor name: mean x^2 per input column} for every Linear with a llama.cpp name, and the
    number of tokens seen. The LM head's entry also serves token_embd when the embeddings are tied."""
    ids = (tokenizer(text, return_tensors="pt")["input_ids"][:, :seq_len] for text in texts)
    return _collect(model, ids)


def collect_rows(model, rows: torch.Tensor) -> tuple[dict[str, np.ndarray], int]:
    """As `collect`, over token rows (samples, seq) such as export/calibration.py's, one row per forward."""
    return _collect(model, (row[None] for row in rows))


@torch.no_grad()
def _collect(model, batches) -> tuple[dict[str, np.ndarray], int]:
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    names = {}
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            name = gguf_name(f"{path}.weight")
            if name is not None:
                names[module] = name

    def hook(module, args, _out):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in)
        name = names[module]
        sums[name] = sums.get(name, 0) + x.square().sum(0).double()

    for module in names:
        hooks.append(module.register_forward_hook(hook))
    tokens = 0
    try:
        for ids in batches:  # (1, T)
            if ids.shape[1] == 0:
                continue
            model(input_ids=ids)
            tokens += ids.shape[1]
    finally:
        for h in hooks:
            h.remove()
    if tokens == 0:
        raise DataError("the calibration text tokenizes to nothing; give longer text for --imatrix")
    out = {name: (s / tokens).float().numpy() for name, s in sums.items()}
    cfg = getattr(model.config, "text_config", None) or model.config
    if getattr(cfg, "tie_word_embeddings", False) and "output.weight" in out:
        out["token_embd.weight"] = out.pop("output.weight")
    return out, tokens


def from_file(model, tokenizer, path: str | Path, *, max_texts: int = 128, seq_len: int = 512) -> dict[str, np.ndarray]:
    texts = calibration_texts(path, tokenizer, max_texts)
    matrix, tokens = collect(model, tokenizer, texts, seq_len)
    print(f"imatrix: {len(matrix)} tensors from {len(texts)} calibration texts ({tokens} tokens, "
          f"up to {seq_len} per text) of {path}", file=sys.stderr)
    return matrix


def resolve(model, tokenizer, quant: str, extra: dict) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """The importance matrix an export uses and what it came from, or (None, None). extra: the export's
    options (imatrix: a path, "none" or unset; source; calibration, calibration_samples, calibration_seq)."""
    choice = extra.get("imatrix")
    if choice is not None and str(choice).lower() == "none":
        return None, None
    if choice:
        return from_file(model, tokenizer, choice), str(choice)
    if quant not in DEFAULT_QUANTS:
        return None, None
    source, file = extra.get("source"), extra.get("calibration")
    if not file and (not source or run_folder_of(source) is None):
        print(f"imatrix: none ({source or 'the source'} is not a leantune run, so it has no training data to "
              f"calibrate {quant} on; pass --imatrix DATA to weigh the k-quants by data)", file=sys.stderr)
        return None, None
    try:
        cal = calibration_rows(tokenizer, file=file, source=source,
                               samples=extra.get("calibration_samples") or DEFAULT_SAMPLES,
                               seq=extra.get("calibration_seq") or DEFAULT_SEQ)
    except LeantuneError as e:
        if file:  # a file the user named must be readable
            raise
        # the run's data moved or needs the network: the default must not stop the export
        print(f"imatrix: none (the run's training data could not be read: {e}); pass --imatrix DATA to "
              f"weigh the k-quants by data", file=sys.stderr)
        return None, None
    matrix, tokens = collect_rows(model, cal.rows)
    where = cal.describe()
    print(f"imatrix: {len(matrix)} tensors from {where} ({tokens} tokens; the default for {quant}, "
          f"--imatrix none turns it off)", file=sys.stderr)
    return matrix, where
