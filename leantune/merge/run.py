"""`leantune merge RUN_OR_ADAPTER --out DIR`: one adapter folded into its base, as a plain HF folder.

The source is what `generate` accepts (a run folder, its adapter/ or a checkpoint, an adapter folder).
Any mergeable method works (LoRA, DoRA, IA3): the merged model comes from the one path,
`infer/materialize.py`, which decides which base the adapter is folded into (for a QLoRA run the
dequantized 4/8-bit base it was trained against, unless --merge-base original) and carries the run's chat
template into the folder's tokenizer. Plain LoRA takes the streamed fold instead (`fold.py`: one
tensor in memory at a time, whatever the base's size), the same arithmetic into the same base.

Every merge writes merge_report.json beside the weights: what was merged into which base; for a QLoRA
run also what the merge cost (`report.py`). The output folder is never one with the user's files in it
(`io/outputs.py`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import ModelError
from ..infer.materialize import BaseChoice, Facts, Located, check_mergeable, facts_for, locate, materialize, run_quant_spec, run_tokenizer
from ..io.atomic import atomic_dir, write_json
from ..io.outputs import check_output_dir, write_manifest
from .combine import read_adapter
from .fold import fold_into_base, model_folder
from .report import merge_cost, summary

REPORT_NAME = "merge_report.json"


def streams(found: Located, facts: Facts) -> bool:
    """Plain LoRA over a base stored as safetensors folds tensor by tensor (`fold.py`); the rest in memory."""
    if facts.method != "lora":
        return False
    try:
        return any(model_folder(found.base_model).glob("*.safetensors"))
    except ModelError:
        return False


def merge_source(source: str, out: str | os.PathLike, *, base: BaseChoice = "dequantized", base_model: str | None = None,
                 report: bool = True, eval_batches: int = 4, overwrite: bool = False,
                 console: Callable[[str], None] = print) -> Path:
    """Fold the adapter of `source` into its base at `out`, with merge_report.json (see the module docstring)."""
    found = locate(source, base_model)
    if found.adapter is None:
        raise ModelError(f"{source} is neither a run folder nor an adapter folder (no adapter_config.json); pass "
                         "runs/NAME or its adapter/ folder")
    check_mergeable(found)
    check_output_dir(out, overwrite=overwrite, sources=[found.adapter, found.base_model])
    facts = facts_for(found, base)
    console(f"merging: {facts.describe()}")
    if streams(found, facts):
        written = _fold(found, base, out)
    else:
        model, tok, facts = materialize(source, base=base, found=found)
        written = save_merged(model, tok, out, getattr(torch, facts.checkpoint_dtype))
    console(f"merged {found.adapter} into {found.base_model}: {written}")
    result = {"merge": facts.as_dict()}
    if facts.quant_bits and report and found.cfg is None:
        console(f"note: {found.adapter} is not inside its run folder, so there is no run data to measure the merge "
                "on; merge_report.json records only what was merged")
    elif facts.quant_bits and report:
        cfg = found.cfg
        if cfg.model != found.base_model:  # --base overrides the run's base for the report too
            cfg.model = found.base_model
        result |= merge_cost(cfg, found.adapter, written, base=base, limit=eval_batches)
        console(summary(result))
    write_json(written / REPORT_NAME, result)
    write_manifest(written)
    return written


def _fold(found: Located, base: BaseChoice, out) -> Path:
    lora = read_adapter(found.adapter)
    spec, quant_dtype = run_quant_spec(found.info)
    return fold_into_base(model_folder(found.base_model), lora.factors, lora.scaling, out, quant=spec,
                          quant_dtype=quant_dtype, base=base,
                          tokenizer=run_tokenizer(found.base_model, found.info))


def save_merged(model, tokenizer, out: str | os.PathLike, dtype: torch.dtype) -> Path:
    """A merged in-memory model as an HF folder in the base checkpoint's dtype, atomically, with its manifest."""
    with atomic_dir(out) as tmp:
        model.to(dtype).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp)
    return Path(out)


def main(ns) -> int:
    merge_source(ns.source, ns.out, base=ns.merge_base, base_model=ns.base_model, report=not ns.no_report,
                 eval_batches=ns.eval_batches, overwrite=ns.overwrite, console=lambda s: print(s, file=sys.stderr))
    return 0
