"""A causal LM with a quantized base (QLoRA), loaded layer by layer; and saved in transformers' bnb format.

`load_quantized` builds the transformers model from its config.json with every parameter on the meta
device, swaps each Linear but the output embedding for an empty bitsandbytes layer (the set
transformers' own bnb loader converts), and streams the safetensors files into it
(`leantune.quant.loader`): the float model never exists whole. A folder saved quantized, by leantune
or by transformers + bitsandbytes (config.json carries `quantization_config`), loads as stored.

`save_quantized` writes what `AutoModelForCausalLM.from_pretrained(folder)` reads back as the same
bnb model: the bnb state dict (packed weights plus their statistics) in model.safetensors, and
config.json with `quantization_config` as `BitsAndBytesConfig.to_dict()` writes it.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..adapters.base import adapter_modules
from ..errors import ConfigError, ModelError
from ..io.atomic import atomic_dir, save_safetensors, write_text
from ..quant import fill_from_safetensors, norm_outputs_in, params_on_meta, quantizable_linears, spec_of, swap_in_quant_linears
from ..quant.spec import QuantSpec, quantization_config_dict, require_bitsandbytes, resolve_spec, spec_from_saved

if TYPE_CHECKING:
    from ..config import QuantConfig

log = logging.getLogger(__name__)

def local_model_dir(src: str) -> Path:
    """A folder holding the safetensors files: `src` itself, or the hub snapshot of a hub id."""
    if Path(src).is_dir():
        return Path(src)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(src, allow_patterns=["*.json", "*.safetensors"]))


def load_quantized(src: str, quant: QuantConfig | QuantSpec | None, *, dtype: torch.dtype, device: torch.device,
                   attn_implementation: str = "sdpa", trust_remote_code: bool = False) -> Any:
    """The model of `src` with quantized Linear layers (see the module docstring), left in train mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    folder = local_model_dir(src)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    saved = getattr(config, "quantization_config", None)
    spec = _choose_spec(saved, quant, device)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{src!r} has no .safetensors weights; quantized loading streams safetensors only (convert "
                         "pytorch_model.bin with transformers' save_pretrained first)")
    if saved is not None:
        delattr(config, "quantization_config")  # the empty model must be a plain one: we place the bnb layers
    t0 = time.perf_counter()
    with params_on_meta(), no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation,
                                                 trust_remote_code=trust_remote_code)
    swap_in_quant_linears(model, quantizable_linears(model, keep=[model.get_output_embeddings()]), spec)
    fill_from_safetensors(model, files, dtype=dtype, device=device)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ModelError(f"{src!r}: the weights lack {missing[0]} (and {len(missing) - 1} more); the folder is "
                         "incomplete or its config.json does not fit them")
    model.to(device)  # buffers built on the CPU (rotary frequencies); quantized weights are there already
    _cast_head_input(model)
    # The residual stream's dtype is the embeddings' (`dtype`): past fp32 norms it stays there (bf16 q, k, v
    # for SDPA's fast kernels); an fp32 `dtype` keeps it fp32 (the rotary tables are fp32 too).
    norm_outputs_in(model, dtype)
    log.info("loaded %s with a %d-bit base in %.1f s", src, spec.bits, time.perf_counter() - t0)
    return model


def _cast_head_input(model: Any) -> None:
    """The fp32 norms make the residual stream fp32 (bitsandbytes returns its output in its input's dtype),
    so the final hidden states reach a bf16 `lm_head` as fp32. PEFT's prepare_model_for_kbit_training
    answers that by upcasting lm_head and the embeddings to fp32 (on a 128k vocabulary, 2 GB more); we
    cast the head's input to the head's dtype instead, which is the rounding a bf16 head does anyway."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None or head.weight.dtype == torch.float32:
        return

    def to_head_dtype(module, args):
        return (args[0].to(module.weight.dtype), *args[1:])

    head.register_forward_pre_hook(to_head_dtype)


def _choose_spec(saved: Any, quant: QuantConfig | QuantSpec | None, device: torch.device) -> QuantSpec:
    if saved is None:
        spec = resolve_spec(quant, device)
        if spec is None:
            raise ConfigError("load_quantized needs quant.bits 4 or 8 for an unquantized model")
        return spec
    qc = saved if isinstance(saved, dict) else saved.to_dict()
    spec = spec_from_saved(qc)
    if quant is not None and quant.bits is not None and quant.bits != spec.bits:
        raise ConfigError(f"the model is saved {spec.bits}-bit but quant.bits is {quant.bits}; set quant.bits "
                          f"{spec.bits} (or null), or start from the unquantized model")
    require_bitsandbytes(spec.bits)
    return spec


def saved_quantization(src: str) -> dict | None:
    """The bitsandbytes `quantization_config` of a local folder's config.json, if it has one."""
    path = Path(src) / "config.json"
    if not path.is_file():
        return None
    qc = json.loads(path.read_text(encoding="utf-8")).get("quantization_config")
    return qc if isinstance(qc, dict) else None


def save_quantized(model: Any, out_dir: str | os.PathLike) -> Path:
    """Write a quantized model (adapters unloaded) as transformers + bitsandbytes save it; atomically."""
    spec = spec_of(model)
    if spec is None:
        raise ModelError("save_quantized needs a model loaded with quant.bits; save a plain model with save_pretrained")
    if adapter_modules(model):
        raise ModelError("the model still holds adapters; save the adapter (save_adapter) and the base separately")
    out = Path(out_dir)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for tied in _tied_keys(model, state):
        state.pop(tied)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config_dict(spec)
    with atomic_dir(out) as tmp:
        save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        write_text(tmp / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
    return out


def _tied_keys(model: Any, state: dict) -> list[str]:
    """The output embedding's key when it is tied to the input embedding: saved once, as transformers does."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return []
    names = [n for n, p in model.named_parameters(remove_duplicate=False) if p is out.weight]
    return [n for n in names if n in state and n.startswith(_module_path(model, out))]


def _module_path(model: Any, module: Any) -> str:
    return next(p for p, m in model.named_modules(remove_duplicate=False) if m is module)
