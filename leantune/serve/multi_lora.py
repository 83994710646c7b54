"""Several LoRA adapters on one base at run time: load them once, switch the active one, stack several
with weights, or switch them all off -- without reloading or copying the base.

    y = base(x) + sum_{n active} w_n * s_n * B_n A_n x          (s_n = alpha_n / r_n, w_n = 1 when switched to)

Each adapted Linear is wrapped once in a `MultiLoraLinear` that holds every loaded adapter's factors
by name; `AdapterSet` is the handle that loads folders and sets what is active on all layers at once.
Serving and evaluation use it to compare adapters on one base; training keeps the single-adapter
`LoraLinear` (adapters/lora.py), which this reuses for the scale and delta.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from ..adapters.base import Adapter, adapter_modules, set_module
from ..adapters.lora import lora_delta, lora_scaling
from ..errors import ConfigError, ModelError
from ..checkpoint.peft_format import read_lora


class MultiLoraLinear(Adapter):
    """A frozen Linear plus any number of named LoRAs, of which a weighted subset is active.

    Not in the adapter registry (it trains nothing new: it composes trained adapters), so it declares
    its method name without registering it.
    """

    method: ClassVar[str] = "multi-lora"

    def __init__(self, base_layer: nn.Linear) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ParameterDict()   # name -> (r, in)
        self.lora_B = nn.ParameterDict()   # name -> (out, r)
        self.scaling: dict[str, float] = {}
        self.active: dict[str, float] = {}

    def add(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        w = self.base_layer.weight
        self.lora_A[name] = nn.Parameter(a.to(w.device, torch.float32), requires_grad=False)
        self.lora_B[name] = nn.Parameter(b.to(w.device, torch.float32), requires_grad=False)
        self.scaling[name] = scaling

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n in self.active for p in (self.lora_A[n], self.lora_B[n])]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or not self.active:
            return result
        xf = x.to(torch.float32)
        update = sum(((xf @ self.lora_A[n].t()) @ self.lora_B[n].t()) * (w * self.scaling[n])
                     for n, w in self.active.items())   # (..., r) then (..., out) per adapter
        return (result + update).to(result.dtype)

    def delta(self) -> torch.Tensor:
        """sum over the active adapters of w_n s_n B_n A_n, (out, in) in fp32."""
        w = self.base_layer.weight
        out = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        for n, weight in self.active.items():
            out += lora_delta(self.lora_A[n], self.lora_B[n], self.scaling[n] * weight)
        return out

    def merge(self) -> None:
        if not self.merged:
            self._fold(+1)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._fold(-1)
            self.merged = False

    def _fold(self, sign: int) -> None:
        weight = self.base_layer.weight
        if not weight.dtype.is_floating_point:
            raise ModelError("cannot fold adapters into a quantized base layer; keep them unmerged (they run as is)")
        with torch.no_grad():
            weight.add_((sign * self.delta()).to(weight.dtype))


@dataclass
class LoadedLora:
    """One plain LoRA folder as read: {module path: (A (r, in), B (out, r))} and its scale s."""

    where: Path
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scaling: float


def read_plain_lora(folder: str | os.PathLike) -> LoadedLora:
    config, by_module = read_lora(folder)
    if config.get("use_dora"):  # W' = m (W + sBA) / ||W + sBA||: not a delta that stacks with others
        raise ModelError(f"{str(folder)!r} is a DoRA adapter; several adapters live on one base as plain LoRA only")
    factors = {p: (f["lora_A"].float(), f["lora_B"].float()) for p, f in by_module.items()}
    return LoadedLora(Path(folder), factors,
                      lora_scaling(int(config["r"]), config["lora_alpha"], bool(config.get("use_rslora", False))))


class AdapterSet:
    """The adapters loaded on one model, by name. `use`, `stack` and `disable` act on every layer."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.loaded: dict[str, LoadedLora] = {}
        self._active: dict[str, float] = {}

    def layers(self) -> dict[str, MultiLoraLinear]:
        return {p: m for p, m in adapter_modules(self.model).items() if isinstance(m, MultiLoraLinear)}

    def add(self, name: str, folder: str | os.PathLike) -> None:
        """Load the adapter folder `folder` as `name` (inactive until `use`/`stack`)."""
        if name in self.loaded:
            raise ConfigError(f"an adapter named {name!r} is already loaded; pick another name")
        lora = read_plain_lora(folder)
        self._check_fits(lora)
        layers = self.layers()
        for path, (a, b) in lora.factors.items():
            layer = layers.get(path)
            if layer is None:
                layer = MultiLoraLinear(self.model.get_submodule(path))
                set_module(self.model, path, layer)
            layer.add(name, a, b, lora.scaling)
        self.loaded[name] = lora

    def _check_fits(self, lora: LoadedLora) -> None:
        modules = dict(self.model.named_modules())
        for path, (a, b) in lora.factors.items():
            module = modules.get(path)
            base = module.base_layer if isinstance(module, MultiLoraLinear) else module
            if isinstance(module, Adapter) and not isinstance(module, MultiLoraLinear):
                raise ModelError(f"{path} already holds a {module.method} adapter; load adapters into a fresh base")
            if not isinstance(base, nn.Linear) or (base.out_features, base.in_features) != (b.shape[0], a.shape[1]):
                raise ModelError(f"{lora.where} was trained for a different base: it adapts {path} as a "
                                 f"{b.shape[0]}x{a.shape[1]} Linear, which this {type(self.model).__name__} lacks")

    def stack(self, weights: Mapping[str, float]) -> None:
        """Make exactly these adapters active, each scaled by its weight (negative subtracts)."""
        unknown = [n for n in weights if n not in self.loaded]
        if unknown:
            raise ConfigError(f"no adapter named {unknown[0]!r} is loaded; loaded: {', '.join(self.loaded) or 'none'}")
        for layer in self.layers().values():
            if layer.merged:
                raise ModelError("the adapters are merged into the base; call unmerge() before changing them")
            layer.active = {n: float(w) for n, w in weights.items() if n in layer.lora_A}
        self._active = {n: float(w) for n, w in weights.items()}

    def use(self, name: str) -> None:
        """Switch to one adapter, at weight 1."""
        self.stack({name: 1.0})

    @property
    def active(self) -> dict[str, float]:
        return dict(self._active)

    def disable(self) -> None:
        """The base alone (the adapters stay loaded)."""
        self.stack({})

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """The base alone inside the block; the active set comes back after it."""
        before = self.active
        self.disable()
        try:
            yield
        finally:
            self.stack(before)


def load_adapters(model: nn.Module, folders: Mapping[str, str | os.PathLike], active: str | None = None) -> AdapterSet:
    """Load several adapter folders onto `model` by name; switch to `active` (default: the first)."""
    adapters = AdapterSet(model)
    for name, folder in folders.items():
        adapters.add(name, folder)
    if folders:
        adapters.use(active or next(iter(folders)))
    return adapters
