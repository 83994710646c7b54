"""`leantune merge RUN_OR_ADAPTER --out DIR`: one adapter folded into its base, as a plain HF folder.

The source is what `generate` accepts (a run folder, its adapter/ or a checkpoint, an adapter folder).
The adapter's sidecar (`leantune.json`, see checkpoint/run_folder.py) says how the base was loaded in
training: its dtype, its `quant` section (a QLoRA run), its chat template. For a QLoRA run whose run
folder is at hand, the merge also measures its own cost on the run's data (`report.py`) into
merge_report.json.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig

from ..adapters.base import unload
from ..adapters.format import read_config
from ..checkpoint.adapter_io import load_adapter
from ..checkpoint.run_folder import RunInfo, find_model_and_adapter, read_run_info, run_config
from ..data.tokenize import resolve_chat_template
from ..device import pick_dtype
from ..errors import ConfigError, ModelError
from ..io.atomic import atomic_dir, write_json
from ..models.load import load_model, load_tokenizer
from ..quant.spec import resolve_spec
from .combine import read_adapter
from .fold import BaseChoice, fold_into_base, model_folder
from .report import merge_cost, summary

REPORT_NAME = "merge_report.json"
BASE_CHOICES = ("dequantized", "original")


def tokenizer_for(model: str, info: RunInfo | None):
    """The base tokenizer, carrying the chat template the run trained with (data.chat_template, if set)."""
    tok = load_tokenizer(model, trust_remote_code=bool(info and info.trust_remote_code))
    if info is not None and info.chat_template:
        tok.chat_template = resolve_chat_template(tok, info.chat_template)
    return tok


def merge_source(source: str, out: str | os.PathLike, *, base: BaseChoice = "dequantized", base_model: str | None = None,
                 report: bool = True, eval_batches: int = 4, console: Callable[[str], None] = print) -> Path:
    """Fold the adapter of `source` into its base at `out`; for a QLoRA run, also write merge_report.json."""
    if base not in BASE_CHOICES:
        raise ConfigError(f"--base must be dequantized or original, got {base!r}")
    model, adapter_dir = find_model_and_adapter(source, base_model)
    if adapter_dir is None:
        raise ModelError(f"{source} is neither a run folder nor an adapter folder (no adapter_config.json); pass "
                         "runs/NAME or its adapter/ folder")
    info = read_run_info(adapter_dir)
    quant = resolve_spec(info.quant_config(), _cpu()) if info is not None else None
    if read_config(adapter_dir).get("peft_type") != "LORA":
        return _fold_in_memory(model, adapter_dir, out, info, quant is not None, console)
    lora = read_adapter(adapter_dir)
    quant_dtype = pick_dtype(info.dtype, "cpu") if info is not None else None
    if quant is not None:
        console(f"the adapter was trained on a {quant.bits}-bit base; merging into the "
                + ("dequantized base it was trained against" if base == "dequantized"
                   else "original 16-bit weights (not what it was trained against)"))
    folder = model_folder(model)
    written = fold_into_base(folder, lora.factors, lora.scaling, out, quant=quant, quant_dtype=quant_dtype,
                             base=base, tokenizer=tokenizer_for(model, info))
    console(f"merged {adapter_dir} into {model}: {written}")
    cfg = run_config(adapter_dir) if quant is not None and report else None
    if quant is not None and report and cfg is None:
        console(f"note: {adapter_dir} is not inside its run folder, so there is no run data to measure the merge "
                f"on; {REPORT_NAME} is not written")
    if cfg is not None:
        if cfg.model != model:  # --base-model overrides the run's base for the report too
            cfg.model = model
        result = merge_cost(cfg, adapter_dir, written, base=base, limit=eval_batches)
        write_json(written / REPORT_NAME, result)
        console(summary(result))
    return written


def _fold_in_memory(model_src: str, adapter_dir: Path, out, info: RunInfo | None, quantized: bool, console) -> Path:
    """Any other registered method: base + adapter loaded through the registry, merged (`unload`), saved
    in the base's dtype. A stopgap beside the streamed LoRA fold until merge and export share one path."""
    if quantized:
        raise ModelError("merging a run of this method trained on a quantized base is not supported yet; merge a "
                         "run trained on a 16-bit base")
    stored = AutoConfig.from_pretrained(model_folder(model_src)).dtype  # the base's own dtype, to write back
    model = load_model(model_src, dtype=torch.float32, device=_cpu())
    load_adapter(model, adapter_dir)
    unload(model, merge=True)  # a method that cannot merge says why here
    model.to(stored if isinstance(stored, torch.dtype) else torch.float32)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer_for(model_src, info).save_pretrained(tmp)
    console(f"merged {adapter_dir} into {model_src}: {out}")
    return Path(out)


def _cpu():
    return torch.device("cpu")


def main(ns) -> int:
    merge_source(ns.source, ns.out, base=ns.base, base_model=ns.base_model, report=not ns.no_report,
                 eval_batches=ns.eval_batches, console=lambda s: print(s, file=sys.stderr))
    return 0
