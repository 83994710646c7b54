"""Adapter formats: how one method's adapter is written to a folder and read back, one class per format,
registered against the method class it serves:

    class IA3Format(AdapterFormat, method=IA3Linear, peft_type="IA3"): ...   # nothing else to edit

Every folder holds adapter_config.json (its `peft_type` names the format) and adapter_model.safetensors,
so `leantune generate` finds the base the same way for all of them. Writing is picked by the class of the
model's adapters (a subclass without a format of its own uses its parent's: DoRA writes LoRA's, with
use_dora), reading by `peft_type`. A method may declare its format in its own file; the built-in ones
live in checkpoint/*_format.py, where the interop key names (PEFT's lora_A, ...) are kept.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch

from ..errors import ModelError
from ..io.atomic import save_safetensors, write_json
from .base import Adapter, adapter_modules, set_module

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

FORMATS: dict[type, type[AdapterFormat]] = {}        # method class -> the format that writes it
BY_PEFT_TYPE: dict[str, type[AdapterFormat]] = {}    # adapter_config.json peft_type -> the format that reads it


class AdapterFormat:
    """Save and load one method's adapters. Subclasses register with `method=TheAdapterClass, peft_type="X"`
    and implement `save`, and `build` (or all of `load` when the skeleton does not fit)."""

    method: ClassVar[type[Adapter]]
    peft_type: ClassVar[str]

    def __init_subclass__(cls, method: type[Adapter] | None = None, peft_type: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if method is None or peft_type is None:
            return
        cls.method, cls.peft_type = method, peft_type
        FORMATS[method] = cls
        BY_PEFT_TYPE[peft_type] = cls

    @classmethod
    def save(cls, model, out_dir: str | Path, *, base_model_name_or_path: str | None = None, section=None) -> Path:
        """Write the model's adapters of this method; `section` is the run's config section (targets asked
        for, init text ...) when there is one."""
        raise NotImplementedError

    @classmethod
    def load(cls, model, adapter_dir: str | Path) -> dict:
        """Attach the saved adapter to `model`; return its config. Every check (in `check_config` and
        `build`) runs before the model is touched, and the global RNG is left as it was (building an
        adapter draws an init that the saved weights replace)."""
        d = Path(adapter_dir)
        config = read_config(d)
        cls.check_config(config, d / CONFIG_NAME)
        weights = read_weights(d)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            adapters = cls.build(model, config, weights, d)
            for path, adapter in adapters.items():
                adapter.train(model.training)  # a new module trains by default; take the model's mode
                set_module(model, path, adapter)
        return config

    @classmethod
    def check_config(cls, config: dict, where: Path) -> None:
        if config.get("peft_type") != cls.peft_type:
            raise ModelError(f"{where} is a {config.get('peft_type')} adapter, not {cls.peft_type}")

    @classmethod
    def build(cls, model, config: dict, weights: dict, where: Path) -> dict[str, Adapter]:
        """{module path: adapter holding the saved weights}, built around `model`'s modules but not yet put
        in place; raise ModelError for anything that does not fit this model. `where` is the folder."""
        raise NotImplementedError


def format_for(method: type[Adapter]) -> type[AdapterFormat]:
    """The format that writes `method`'s adapters: its own, else the nearest parent's."""
    for cls in method.__mro__:
        if cls in FORMATS:
            return FORMATS[cls]
    raise ModelError(f"method {method.method!r} has no adapter format; declare an AdapterFormat subclass "
                     f"with method={method.__name__} (see leantune/adapters/format.py)")


def adapters_of(model, method: type[Adapter], writer: str) -> dict[str, Adapter]:
    """The model's adapters, all of `method` (subclasses included), or a ModelError naming what it holds."""
    adapters = adapter_modules(model)
    if not adapters or not all(isinstance(a, method) for a in adapters.values()):
        raise ModelError(f"{writer} writes {method.method} adapters only; this model holds "
                         f"{', '.join(sorted({a.method for a in adapters.values()})) or 'none'}")
    return adapters


def write_folder(out_dir: str | Path, tensors: dict, config: dict) -> Path:
    """Weights first, config last: readers (PEFT included) open the config first, so a folder that has
    one has both."""
    out = Path(out_dir)
    save_safetensors(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json(out / CONFIG_NAME, config)
    return out


def read_config(adapter_dir: str | Path) -> dict:
    d = Path(adapter_dir)
    if not d.is_dir():
        raise ModelError(f"adapter folder {str(d)!r} does not exist; pass the folder holding {CONFIG_NAME}")
    if not (d / CONFIG_NAME).is_file():
        raise ModelError(f"{str(d)!r} has no {CONFIG_NAME}; is it an adapter folder (e.g. runs/x/adapter)?")
    try:
        config = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelError(f"{d / CONFIG_NAME} is not valid JSON ({e}); re-save the adapter") from None
    if not isinstance(config, dict):
        raise ModelError(f"{d / CONFIG_NAME} must hold a JSON object; re-save the adapter")
    return config


def read_weights(adapter_dir: Path) -> dict:
    """The adapter folder's tensors, from safetensors only (a pickled adapter_model.bin is named, not read)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(adapter_dir) / WEIGHTS_NAME
    if not path.is_file():
        bin_hint = " (adapter_model.bin is a pickle, which leantune never loads: re-save it with safetensors)" \
            if (path.parent / "adapter_model.bin").exists() else ""
        raise ModelError(f"{str(path.parent)!r} has no {WEIGHTS_NAME}{bin_hint}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path} cannot be read as safetensors ({e}); re-save the adapter") from None


