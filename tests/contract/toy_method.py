"""A toy fine-tuning method in one file, to show (and test) that a method is one file plus a row in the
contract table: its config section, its class (attach, count, merge) and its on-disk format are all here,
and `leantune train / generate / merge` take it with no other edit (tests/contract/test_toy_method.py).

Channel scaling: a learned vector rescales each target Linear's output, y = s * base(x), s: (out,) starting
at ones (so the model starts as the base). Merging folds it into the weight, W <- diag(s) W. (IA3 without
its feed-forward case; saved in a format of its own.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from leantune.adapters.base import Adapter, find_targets, require_linear, set_module
from leantune.adapters.format import AdapterFormat, adapters_of, write_folder
from leantune.config import need, normalise_targets, option
from leantune.errors import ModelError

NAME = "toy_scale"


@dataclass
class ToyScaleConfig:
    targets: str | list[str] = option(["o_proj"], "toy method: modules whose output is rescaled")
    start: float = option(1.0, "toy method: the scale every channel starts at")

    def __post_init__(self) -> None:
        self.targets = normalise_targets(self.targets)


class ChannelScale(Adapter, method=NAME):
    config_cls = ToyScaleConfig
    config_section = NAME
    title = "toy channel scaling (toy_scale.*)"
    summary = "a learned scale per output channel (a test's toy)"

    @classmethod
    def check(cls, cfg) -> None:
        need(cfg.toy_scale.start > 0, f"toy_scale.start must be > 0, got {cfg.toy_scale.start}")

    @classmethod
    def attach(cls, model: nn.Module, section, tokenizer=None) -> list[str]:
        paths = find_targets(model, section.targets, key=f"{NAME}.targets")
        require_linear(model, paths, NAME)
        for path in paths:
            set_module(model, path, cls(model.get_submodule(path), section.start))
        return paths

    @classmethod
    def count_parameters(cls, model: nn.Module, section) -> int:
        return sum(model.get_submodule(p).out_features for p in find_targets(model, section.targets))

    def __init__(self, base_layer: nn.Linear, start: float = 1.0) -> None:
        super().__init__(base_layer)
        weight = base_layer.weight
        device = weight.device if weight.device.type != "meta" else None
        self.scale = nn.Parameter(torch.full((base_layer.out_features,), float(start), device=device))

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.scale]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)
        return out if self.merged else (out * self.scale).to(out.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.base_layer.weight.dtype.is_floating_point:
            raise ModelError("cannot merge the toy scale into a quantized base layer; load the base in bf16/fp32")
        if not self.merged:
            self.base_layer.weight.mul_(self.scale.view(-1, 1).to(self.base_layer.weight.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight.div_(self.scale.view(-1, 1).to(self.base_layer.weight.dtype))
            self.merged = False


class ChannelScaleFormat(AdapterFormat, method=ChannelScale, peft_type="TOY_SCALE"):
    """adapter_config.json {"peft_type": "TOY_SCALE", "base_model_name_or_path"}; <path>.scale (out,)."""

    @classmethod
    def save(cls, model, out_dir, *, base_model_name_or_path=None, section=None) -> Path:
        adapters = adapters_of(model, ChannelScale, "the toy writer")
        tensors = {f"{path}.scale": a.scale.detach().cpu() for path, a in adapters.items()}
        config = {"peft_type": cls.peft_type, "base_model_name_or_path": base_model_name_or_path and str(base_model_name_or_path)}
        return write_folder(out_dir, tensors, config)

    @classmethod
    def build(cls, model, config: dict, weights: dict, where: Path) -> dict:
        modules = dict(model.named_modules())
        built = {}
        for key, vector in weights.items():
            path = key.removesuffix(".scale")
            layer = modules.get(path)
            if not isinstance(layer, nn.Linear) or vector.shape != (layer.out_features,):
                raise ModelError(f"{where}: {key} does not fit this model; load it into the base it was trained on")
            built[path] = ChannelScale(layer)
            built[path].scale.copy_(vector)
        return built
