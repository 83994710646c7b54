"""The merged model of a run, in memory: the one path `leantune merge`, `leantune export` and (later) the
server take from "what the user points at" to a plain model with the adapter folded in.

    source -> (base model, adapter folder, the run's config)      checkpoint/run_folder.py
           -> base loaded in float32 (the weights the adapter was trained against, see below)
           -> any method's adapter attached by the registry         checkpoint/adapter_io.load_adapter
           -> unload(merge=True): every adapter folded into its base layer (LoRA, DoRA, IA3)
           -> (model, tokenizer carrying the run's chat template, facts)

Over a 4-bit/8-bit base (a QLoRA run) the adapter was trained against dequant(quant(W)), not W. This
path decides once which base it folds into, and says so in `facts`:
  base="dequantized"  every Linear the run's loader quantized gets W := dequant(quant(W)) first, with the
                      run's dtype and quant settings: the model the adapter was trained and evaluated as
                      (the default, as `leantune merge` always did);
  base="original"     the 16-bit weights, which the adapter never saw.
`merge/fold.py` streams the same arithmetic tensor by tensor for plain LoRA (low memory); it calls
`dequantized` below, so both paths fold into the same base.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..adapters.base import ADAPTERS, adapter_modules, unload
from ..adapters.format import BY_PEFT_TYPE, read_config
from ..checkpoint.adapter_io import load_adapter

from ..checkpoint.run_folder import RunInfo, find_model_and_adapter, run_config, run_info
from ..config import RunConfig
from ..data.tokenize import resolve_chat_template
from ..device import pick_dtype
from ..errors import ConfigError, ModelError
from ..models.load import load_model, load_tokenizer, resolve_source
from ..quant.layers import dequantize, new_quant_linear, quantize_weight
from ..quant.loader import quantizable_linears
from ..quant.spec import QuantSpec, resolve_spec

BaseChoice = Literal["dequantized", "original"]
BASE_CHOICES = ("dequantized", "original")


@dataclass
class Facts:
    """What was merged into what: printed by the commands and recorded in their reports."""

    base_model: str
    adapter: str | None                 # the adapter folder, None for a plain model
    method: str | None                  # lora, dora, ia3 ... (None: no adapter)
    base: str                           # "16-bit" | "dequantized" | "original": the weights it was folded into
    quant_bits: int | None              # the run's quant.bits (a QLoRA run), else None
    quant_type: str | None
    chat_template: str | None           # the run's data.chat_template, resolved to Jinja (None: the base's own)
    system_prompt: str | None           # the run's data.system_prompt
    checkpoint_dtype: str               # the base checkpoint's own dtype, what a merged folder is written in

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        if self.adapter is None:
            return f"{self.base_model} (no adapter)"
        into = {"16-bit": "its base", "dequantized": f"the dequantized {self.quant_bits}-bit base it was trained against",
                "original": "the original 16-bit weights (not the 4/8-bit base it was trained against)"}[self.base]
        return f"{self.method} adapter {self.adapter} folded into {into} ({self.base_model})"


@dataclass
class Located:
    """A source resolved without loading anything: what `materialize` will load."""

    base_model: str
    adapter: Path | None
    info: RunInfo | None                # the adapter's sidecar: how it was trained (quant, dtype, template)
    cfg: RunConfig | None               # the whole run config when the run folder is at hand (its data: reports)
    adapter_config: dict


def locate(source: str, base_model: str | None = None) -> Located:
    model, adapter = find_model_and_adapter(source, base_model)
    return Located(model, adapter, run_info(source), run_config(source),
                   read_config(adapter) if adapter is not None else {})


def adapter_method(adapter_config: dict) -> str | None:
    """The registered method that an adapter_config.json holds (by its peft_type: adapters/format.py)."""
    kind = adapter_config.get("peft_type")
    if kind is None:
        return None
    if kind == "LORA":
        return "dora" if adapter_config.get("use_dora") else "lora"
    fmt = BY_PEFT_TYPE.get(kind)
    return fmt.method.method if fmt is not None else str(kind).lower()


def run_quant_spec(info: RunInfo | None) -> tuple[QuantSpec | None, torch.dtype]:
    """(the run's quant spec, the dtype its loader cast weights to before quantizing), None for a 16-bit run."""
    quant = info.quant_config() if info is not None else None
    if quant is None or not quant.bits:
        return None, torch.float32
    return resolve_spec(quant, torch.device("cpu")), pick_dtype(info.dtype, "cpu")


def run_tokenizer(model: str, info: RunInfo | None):
    """The base tokenizer, carrying the chat template the run trained with (data.chat_template, if set)."""
    tok = load_tokenizer(model, trust_remote_code=bool(info and info.trust_remote_code))
    if info is not None and info.chat_template:
        tok.chat_template = resolve_chat_template(tok, info.chat_template)
    return tok


def dequantized(weight: Tensor, spec: QuantSpec, dtype: torch.dtype) -> Tensor:
    """dequant(quant(W)) as the training run's loader made it: cast to its dtype, then quantized (fp32 out)."""
    out_features, in_features = weight.shape
    layer = new_quant_linear(in_features, out_features, False, spec)
    quantize_weight(layer, weight.to(dtype))
    return dequantize(layer).float()


def checkpoint_dtype(folder: str) -> torch.dtype:
    """The dtype a model folder's config.json says its weights are stored in (float32 when it says none)."""
    path = Path(resolve_source(folder, need_weights=False)) / "config.json"
    cfg = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").removeprefix("torch.")
    dtype = getattr(torch, name, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def facts_for(found: Located, base: BaseChoice) -> Facts:
    info = found.info
    quant = info.quant_config() if info is not None else None
    quant = quant if quant is not None and quant.bits else None
    template = resolve_chat_template(None, info.chat_template) if info is not None and info.chat_template else None
    return Facts(base_model=str(found.base_model), adapter=str(found.adapter) if found.adapter else None,
                 method=adapter_method(found.adapter_config), base=base if quant is not None else "16-bit",
                 quant_bits=quant.bits if quant else None,
                 quant_type=(quant.type if quant.bits == 4 else None) if quant else None,
                 chat_template=template, system_prompt=info.system_prompt if info is not None else None,
                 checkpoint_dtype=str(checkpoint_dtype(str(found.base_model))).removeprefix("torch."))


def materialize(source: str, *, base: BaseChoice = "dequantized", base_model: str | None = None,
                merge: bool = True, found: Located | None = None):
    """(model in float32 on the CPU, eval, no grad; its tokenizer; Facts) for a run, an adapter or a model.

    merge=False keeps the adapter attached (for exporters that write the adapter alone)."""
    if base not in BASE_CHOICES:
        raise ConfigError(f"--merge-base must be dequantized or original, got {base!r}")
    found = found or locate(source, base_model)
    if merge:
        check_mergeable(found)
    facts = facts_for(found, base)
    spec, quant_dtype = run_quant_spec(found.info)
    trust = bool(found.info and found.info.trust_remote_code)
    model = load_model(found.base_model, dtype=torch.float32, device="cpu", trust_remote_code=trust)
    model.eval().requires_grad_(False)
    if spec is not None and base == "dequantized":
        _dequantize_in_place(model, spec, quant_dtype)
    if found.adapter is not None:
        load_adapter(model, found.adapter)
        if merge:
            _refuse_unmergeable(model, found.adapter)
            unload(model, merge=True)
    return model, run_tokenizer(found.base_model, found.info), facts


def _dequantize_in_place(model, spec: QuantSpec, dtype: torch.dtype) -> None:
    """W := dequant(quant(W)) for every Linear a 4/8-bit load of this model quantizes."""
    for path in quantizable_linears(model, keep=[model.get_output_embeddings()]):
        layer = model.get_submodule(path)
        with torch.no_grad():
            layer.weight.copy_(dequantized(layer.weight, spec, dtype))


def check_mergeable(found: Located) -> None:
    """Refuse, before anything is loaded, an adapter whose method cannot fold into the base weights."""
    cls = ADAPTERS.get(adapter_method(found.adapter_config) or "")
    if cls is not None and not cls.mergeable:
        _refuse(found.adapter, cls.method, cls.why_not_mergeable)


def _refuse_unmergeable(model, adapter: Path) -> None:
    for adapter_module in adapter_modules(model).values():
        if not adapter_module.mergeable:
            _refuse(adapter, adapter_module.method, adapter_module.why_not_mergeable)


def _refuse(adapter, method: str, why: str) -> None:
    raise ModelError(f"{adapter} is a {method} adapter, which cannot be folded into its base: {why}")
