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

from ..adapters.base import Adapter, adapter_dtype, adapter_modules, set_module
from ..adapters.bottleneck import ACTIVATIONS, BottleneckAdapter
from ..errors import ModelError
from ..io.atomic import save_safetensors, write_json
from .peft_format import CONFIG_NAME, WEIGHTS_NAME, read_config, read_weights

PEFT_TYPE = "BOTTLENECK"
FORMAT_VERSION = 1
PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")


def save_bottleneck(model, out_dir: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    adapters = adapter_modules(model)
    if not adapters or {a.method for a in adapters.values()} != {"bottleneck"}:
        raise ModelError("save_bottleneck writes bottleneck adapters only; this model holds "
                         f"{', '.join(sorted({a.method for a in adapters.values()})) or 'none'}")
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
    out = Path(out_dir)
    save_safetensors(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json(out / CONFIG_NAME, config)  # last: a folder with a config is complete
    return out


def load_bottleneck(model, adapter_dir: str | Path) -> dict:
    """Wrap the saved sublayers of `model` in bottleneck adapters and load their weights; return the config."""
    import torch

    d = Path(adapter_dir)
    config = read_config(d)
    if config.get("peft_type") != PEFT_TYPE or config.get("format_version") != FORMAT_VERSION:
        raise ModelError(f"{d / CONFIG_NAME} is not a leantune bottleneck adapter (format_version {FORMAT_VERSION})")
    size, hidden, activation = config.get("size"), config.get("hidden_size"), config.get("activation")
    if not isinstance(size, int) or not isinstance(hidden, int) or activation not in ACTIVATIONS:
        raise ModelError(f"{d / CONFIG_NAME}: size, hidden_size and activation are missing or damaged; re-save it")
    weights = read_weights(d)
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
        raise ModelError(f"{d / WEIGHTS_NAME} lacks {absent[0]}; the file is incomplete")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for path in [p for p in modules if p in paths]:
            if isinstance(modules[path], Adapter):
                raise ModelError(f"{path} already holds a {modules[path].method} adapter; load into a fresh base")
            dtype = adapter_dtype(next(modules[path].parameters()).dtype)
            adapter = BottleneckAdapter(modules[path], hidden, size, activation, after=after[path], dtype=dtype)
            for part in PARTS:
                sub, name = part.split(".")
                getattr(getattr(adapter, sub), name).copy_(weights[f"{path}.{part}"])
            adapter.train(model.training)  # a new module trains by default; take the model's mode
            set_module(model, path, adapter)
    return config
