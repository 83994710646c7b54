"""Fold a LoRA update into its base and write a plain Hugging Face model folder, tensor by tensor.

    W' = W_base + s * B @ A        for every adapted Linear; every other tensor is copied as stored

Each of the base's safetensors files is copied under its own name (the shard index with it) and the
bytes of each changed weight are overwritten in place: a merged weight keeps its dtype and shape, so it
keeps its byte range. Only one weight is in memory at a time (plus the adapter), whatever the model's
size. The output folder appears complete or not at all (`atomic_dir`): a failed merge leaves nothing.

Over a 4-bit/8-bit base (a QLoRA run), the adapter was trained against dequant(quant(W)), not W:
  base="dequantized"  W_base = dequant(quant(W)) for every quantized Linear -- the model the adapter was
                      trained and evaluated as (the default);
  base="original"     W_base = W, the 16-bit weights, which the adapter never saw.
Either way the weights are written in the base checkpoint's own dtype; dequant(quant(W)) is computed by
`infer/materialize.py`'s `dequantized`, the same function the in-memory path uses. This is the
low-memory path `merge/run.py` takes for plain LoRA; other methods go through `materialize`. `report.py`
measures what the choice cost (held-out loss and logit KL against the unmerged adapter on the quantized base).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..errors import ModelError
from ..io.atomic import atomic_dir
from ..io.outputs import write_manifest
from ..io.tensor_file import TensorFile
from ..models.load import resolve_source
from ..infer.materialize import BaseChoice, dequantized
from ..quant.loader import quantizable_linears

if TYPE_CHECKING:
    from ..quant import QuantSpec

# Files of the base folder that describe weights we rewrite, or that are leantune's own bookkeeping.
_SKIP = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_SKIP_NAMES = ("leantune-gguf.json",)


def model_folder(source: str) -> Path:
    """The local folder of a base model (a folder, a converted .gguf, or a hub id in the local cache)."""
    src = resolve_source(source)
    if Path(src).is_dir():
        return Path(src)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(src))


def module_layout(folder: Path, trust_remote_code: bool = False) -> tuple[list[str], set[str]]:
    """(every module path in model order, the Linear paths a 4/8-bit load quantizes), from config.json
    alone: the model is built on the meta device, so this costs no weight memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    if getattr(config, "quantization_config", None) is not None:
        raise ModelError(f"{folder} is saved quantized; merging needs the 16-bit base it was quantized from: pass "
                         "that with --base")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    order = [p for p, _ in model.named_modules()]
    return order, set(quantizable_linears(model, keep=[model.get_output_embeddings()]))


def fold_into_base(base_folder: Path, factors: dict[str, tuple[Tensor, Tensor]], scaling: float, out_dir: str | os.PathLike,
                   *, quant: QuantSpec | None = None, quant_dtype: torch.dtype = torch.float32,
                   base: BaseChoice = "dequantized", tokenizer=None) -> Path:
    """Write base + s * B @ A as an HF folder at `out_dir` (see the module docstring)."""
    files = sorted(base_folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{base_folder} has no .safetensors weights; merging streams safetensors only (re-save the "
                         "base with transformers' save_pretrained)")
    _, quantizable = module_layout(base_folder)
    requantize = quantizable if quant is not None and base == "dequantized" else set()
    with atomic_dir(out_dir) as tmp:
        done = set()
        for f in files:
            done |= _fold_file(f, tmp / f.name, factors, scaling, requantize, quant, quant_dtype)
        missing = sorted(set(factors) - done)
        if missing:
            raise ModelError(f"the adapter was trained for a different base: {base_folder} has no weight for "
                             f"{missing[0]} (and {len(missing) - 1} more); pass the base it was trained on")
        _copy_side_files(base_folder, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_manifest(tmp)
    return Path(out_dir)


def _fold_file(src: Path, dst: Path, factors: dict[str, tuple[Tensor, Tensor]], scaling: float,
               requantize: set[str], quant: QuantSpec | None, quant_dtype: torch.dtype) -> set[str]:
    """Copy one shard, then overwrite the bytes of each weight that changes; return the adapted paths it held.

    A merged weight keeps its dtype and shape, so it keeps its byte range: the header (and every other
    tensor) is copied as is and only one tensor at a time is ever in memory. Tensors are read with plain
    reads, not through a memory map, whose touched pages would stay resident until the file is closed.
    """
    tensors = TensorFile(src)
    shutil.copyfile(src, dst)
    folded = set()
    with open(dst, "r+b") as out:
        for key in tensors.keys():
            path, _, leaf = key.rpartition(".")
            if leaf != "weight" or (path not in factors and path not in requantize):
                continue
            if tensors.entries[key]["dtype"] not in _FLOAT_DTYPES:
                raise ModelError(f"{key} is stored as {tensors.entries[key]['dtype']}, not as floats: the base is saved "
                                 "quantized; merging needs the 16-bit base it was quantized from (pass it with --base)")
            merged = _merged_weight(tensors.get(key), path, factors.get(path), scaling,
                                    quant if path in requantize else None, quant_dtype)
            out.seek(tensors.span(key)[0])
            out.write(merged.contiguous().view(-1).view(torch.uint8).numpy().tobytes())  # little-endian, as stored
            if path in factors:
                folded.add(path)
        out.flush()
        os.fsync(out.fileno())
    return folded


_FLOAT_DTYPES = ("F64", "F32", "BF16", "F16")


def _merged_weight(weight: Tensor, path: str, pair: tuple[Tensor, Tensor] | None, scaling: float,
                   quant: QuantSpec | None, quant_dtype: torch.dtype) -> Tensor:
    w = dequantized(weight, quant, quant_dtype) if quant is not None else weight.float()
    if pair is not None:
        a, b = pair
        if (b.shape[0], a.shape[1]) != tuple(w.shape):
            raise ModelError(f"the adapter was trained for a different base: {path} is {tuple(w.shape)} here but "
                             f"the adapter's update is {(b.shape[0], a.shape[1])}; pass the base it was trained on")
        w = w.addmm_(b.float(), a.float(), alpha=scaling)   # W + s * (out, r) @ (r, in), in fp32
    return w.to(weight.dtype)


def _copy_side_files(src: Path, dst: Path) -> None:
    """config.json, generation config, tokenizer files, the shard index: everything but weights."""
    for f in _side_files(src):
        shutil.copy2(f, dst / f.name)


def _side_files(folder: Path) -> Iterable[Path]:
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith(".") and not f.name.endswith(_SKIP) and f.name not in _SKIP_NAMES:
            yield f
