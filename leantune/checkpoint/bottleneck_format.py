"""Bottleneck adapters on disk: leantune's own format, shaped like a PEFT folder (no PEFT loads these).

  adapter_config.json         {"peft_type": "BOTTLENECK", "format": "leantune", "format_version": 1,
                               "base_model_name_or_path", "style", "size", "activation", "hidden_size",
                               "modules": {module path: "attention" or "ffn", in model order}}
  adapter_model.safetensors   <module path>.down.weight (size, hidden)   <module path>.down.bias (size,)
                              <module path>.up.weight   (hidden, size)   <module path>.up.bias   (hidden,)
The adapter at each path is applied to that sublayer's output: h + up(act(down(h))). Keys carry no
"base_model.model." prefix: nothing but leantune reads them. The full description is docs/methods.md.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters.base import Adapter, adapter_dtype
from ..adapters.bottleneck import ACTIVATIONS, BottleneckAdapter
from ..errors import ModelError
from ..adapters.format import WEIGHTS_NAME, AdapterFormat, adapters_of, write_folder

PEFT_TYPE = "BOTTLENECK"
FORMAT_VERSION = 1
PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


class BottleneckFormat(AdapterFormat, method=BottleneckAdapter, peft_type=PEFT_TYPE):
    """leantune's own bottleneck folder (format_version 1)."""

    @classmethod
    def save(cls, model, out_dir: str | Path, *, base_model_name_or_path: str | None = None, section=None) -> Path:
        adapters = adapters_of(model, BottleneckAdapter, "the bottleneck writer")
        first = next(iter(adapters.values()))
        config = {
            "peft_type": PEFT_TYPE, "format": "leantune", "format_version": FORMAT_VERSION,
            "base_model_name_or_path": None if base_model_name_or_path is None else str(base_model_name_or_path),
            "style": "houlsby" if any(a.after == "attention" for a in adapters.values()) else "pfeiffer",
            "size": first.size, "activation": first.activation, "hidden_size": first.hidden,
            "modules": {path: a.after for path, a in adapters.items()},
        }
        tensors = {}
        for path, a in adapters.items():
            for part in PARTS:
                module, name = part.split(".")
                tensors[f"{path}.{part}"] = getattr(getattr(a, module), name).detach().cpu()
        return write_folder(out_dir, tensors, config)

    @classmethod
    def check_config(cls, config: dict, where: Path) -> None:
        if config.get("peft_type") != PEFT_TYPE or config.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"{where} is not a leantune bottleneck adapter (format_version {FORMAT_VERSION})")
        size, hidden, activation = config.get("size"), config.get("hidden_size"), config.get("activation")
        if not isinstance(size, int) or not isinstance(hidden, int) or activation not in ACTIVATIONS:
            raise ModelError(f"{where}: size, hidden_size and activation are missing or damaged; re-save it")

    @classmethod
    def build(cls, model, config: dict, weights: dict, where: Path) -> dict:
        size, hidden, activation = config["size"], config["hidden_size"], config["activation"]
        modules = dict(model.named_modules())
        after = config.get("modules") if isinstance(config.get("modules"), dict) else {}
        paths = list(after)
        missing = [p for p in paths if p not in modules]
        if missing or not paths:
            raise ModelError(f"adapter was trained for a different base: this {type(model).__name__} has no module "
                             f"{missing[0] if missing else '(none listed)'}")
        if getattr(getattr(model, "config", None), "hidden_size", hidden) != hidden:
            raise ModelError(f"adapter was trained for a different base: hidden size {hidden}, this model has "
                             f"{model.config.hidden_size}")
        absent = [f"{p}.{part}" for p in paths for part in PARTS if f"{p}.{part}" not in weights]
        if absent:
            raise ModelError(f"{where / WEIGHTS_NAME} lacks {absent[0]}; the file is incomplete")
        built = {}
        for path in [p for p in modules if p in paths]:
            if isinstance(modules[path], Adapter):
                raise ModelError(f"{path} already holds a {modules[path].method} adapter; load into a fresh base")
            dtype = adapter_dtype(next(modules[path].parameters()).dtype)
            adapter = BottleneckAdapter(modules[path], hidden, size, activation, after=after[path], dtype=dtype)
            for part in PARTS:
                sub, name = part.split(".")
                getattr(getattr(adapter, sub), name).copy_(weights[f"{path}.{part}"])
            built[path] = adapter
        return built
