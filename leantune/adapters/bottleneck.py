"""Bottleneck adapters: a small residual MLP after a sublayer (Houlsby et al. 2019,
https://arxiv.org/abs/1902.00751; Pfeiffer et al. 2020, https://arxiv.org/abs/2005.00247).

    h' = h + U(f(D h))        D: (size, hidden) down-projection, f a nonlinearity, U: (hidden, size)

U starts at zero, so the model starts as the base. The adapter wraps a whole sublayer by its path and
acts on the sublayer's output, before the block's own residual add:
  houlsby   after the attention (self_attn) and after the feed-forward (mlp) of every block
  pfeiffer  after the feed-forward only (half the adapters, about the same quality in the paper)
Trainable parameters per adapter: 2 * hidden * size + size + hidden (both projections carry a bias).
The nonlinearity keeps it from folding into any base weight: it is not mergeable and stays attached.
Saved in leantune's own format (leantune/checkpoint/bottleneck_format.py; see docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import need, option
from ..errors import ConfigError, ModelError
from .base import Adapter, adapter_dtype, find_targets, set_module

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
STYLES = ("houlsby", "pfeiffer")


@dataclass
class BottleneckConfig:
    """The `bottleneck:` section."""

    style: Literal["houlsby", "pfeiffer"] = option(
        "houlsby", "houlsby: adapters after attention and after the feed-forward; pfeiffer: after the feed-forward only")
    size: int = option(64, "bottleneck width: the down-projection's output size (AdapterHub: hidden / reduction_factor)")
    activation: Literal["relu", "gelu", "silu", "tanh"] = option("relu", "nonlinearity between the down- and up-projection")
    attention: list[str] = option(["self_attn"], "names of the attention sublayers an adapter follows (houlsby)")
    ffn: list[str] = option(["mlp"], "names of the feed-forward sublayers an adapter follows")


class BottleneckAdapter(Adapter, method="bottleneck"):
    """Down-projection, nonlinearity, zero-initialised up-projection, residual; after one sublayer."""

    config_cls = BottleneckConfig
    config_section = "bottleneck"
    title = "bottleneck adapters (bottleneck.*)"
    summary = "residual adapter MLPs"
    mergeable = False
    why_not_mergeable = ("bottleneck adapters have a nonlinearity and cannot be merged into the base weights; "
                         "keep them attached (leantune generate does), or train lora/dora/ia3 to merge")

    @classmethod
    def attach(cls, model: nn.Module, section, tokenizer=None) -> list[str]:
        return inject_bottleneck(model, section.style, section.size, section.activation,
                                 attention=section.attention, ffn=section.ffn)

    @classmethod
    def check(cls, cfg) -> None:
        size = cfg.bottleneck.size
        need(size > 0, f"bottleneck.size must be > 0, got {size}; typical values are 16-256")

    @classmethod
    def count_parameters(cls, model: nn.Module, section) -> int:
        """2 * hidden * size + size + hidden per adapted sublayer (both projections carry a bias)."""
        hidden, size = _hidden_size(model), section.size
        return len(_plan(model, section.style, section.attention, section.ffn)) * (2 * hidden * size + size + hidden)

    def __init__(self, base_layer: nn.Module, hidden: int, size: int, activation: str = "relu",
                 after: str = "ffn", dtype: torch.dtype = torch.float32) -> None:
        super().__init__(base_layer)
        self.hidden, self.size, self.activation, self.after = hidden, size, activation, after
        self.down = nn.Linear(hidden, size, dtype=dtype)  # torch's default init (kaiming-uniform)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden, dtype=dtype)
        with torch.no_grad():  # the identity at the start: the residual branch adds exactly zero
            self.up.weight.zero_()
            self.up.bias.zero_()
        device = next((p.device for p in base_layer.parameters() if p.device.type != "meta"), None)
        if device is not None:
            self.to(device)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.down.weight, self.down.bias, self.up.weight, self.up.bias]

    def _adapt(self, h: torch.Tensor) -> torch.Tensor:
        branch = self.up(self.act(self.down(h.to(self.down.weight.dtype))))  # (..., hidden)
        return (h + branch).to(h.dtype)

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, tuple):  # attention returns (hidden, weights, ...): adapt the hidden state only
            return (self._adapt(out[0]), *out[1:])
        return self._adapt(out)

    def extra_repr(self) -> str:
        return f"after {self.after}: hidden={self.hidden}, size={self.size}, activation={self.activation}"


def _hidden_size(model: nn.Module) -> int:
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise ModelError(f"{type(model).__name__} has no config.hidden_size, so the bottleneck adapters' width is "
                         "unknown; use a transformers model, or lora/ia3")
    return hidden


def _sublayers(model: nn.Module, names: Sequence[str], key: str) -> list[str]:
    """Paths of the sublayers called `names`; an error lists the sublayer names the blocks do have."""
    try:
        return find_targets(model, list(names), key=key)
    except ModelError:
        # The children of numbered blocks (model.layers.3.<name>) are the sublayers one can follow.
        blocks = [m for p, m in model.named_modules() if p.rsplit(".", 1)[-1].isdigit()]
        children = sorted({n for b in blocks for n, _ in b.named_children()})
        raise ModelError(f"{key} {list(names)} match no sublayer of {type(model).__name__}; its blocks hold: "
                         f"{', '.join(children) or '(no numbered blocks)'}. Name the attention/feed-forward ones") from None


def inject_bottleneck(model: nn.Module, style: str = "houlsby", size: int = 64, activation: str = "relu",
                      attention: Sequence[str] = ("self_attn",), ffn: Sequence[str] = ("mlp",)) -> list[str]:
    """Wrap the attention (houlsby only) and feed-forward sublayers named by `attention` / `ffn`.

    Returns the adapted paths in module order; trainability is left alone.
    """
    if style not in STYLES:
        raise ConfigError(f"bottleneck.style must be one of {', '.join(STYLES)}, got {style!r}")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"bottleneck.activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
    if not isinstance(size, int) or size <= 0:
        raise ConfigError(f"bottleneck.size must be a positive integer, got {size!r}; typical values are 16-256")
    hidden = _hidden_size(model)
    after = _plan(model, style, attention, ffn)
    paths = list(after)
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, Adapter):
            raise ModelError(f"{path} already has a {module.method} adapter; unload(model) first")
    for path in paths:
        base = model.get_submodule(path)
        dtype = adapter_dtype(next(base.parameters()).dtype)
        set_module(model, path, BottleneckAdapter(base, hidden, size, activation, after[path], dtype=dtype))
    return paths


def _plan(model: nn.Module, style: str, attention: Sequence[str], ffn: Sequence[str]) -> dict[str, str]:
    """{sublayer path: "attention" or "ffn"} in module order."""
    after = dict.fromkeys(_sublayers(model, ffn, "bottleneck.ffn"), "ffn")
    if style == "houlsby":
        after.update(dict.fromkeys(_sublayers(model, attention, "bottleneck.attention"), "attention"))
    return {p: after[p] for p, _ in model.named_modules() if p in after}
