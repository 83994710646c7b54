"""(IA)^3: Infused Adapter by Inhibiting and Amplifying Inner Activations (Liu et al. 2022,
https://arxiv.org/abs/2205.05638).

A learned vector rescales a layer's output, or, for the feed-forward layer, its input:

    y = l * base(x)          l: (out,)   keys and values (k_proj, v_proj)
    y = base(l * x)          l: (in,)    the feed-forward input of down_proj

l starts at ones, so the model starts as the base. Both forms fold into the weight (merge):
W <- diag(l) W (and the bias scales with it) or W <- W diag(l). Unmerging divides by l again, which is
exact up to rounding while no entry of l is near zero.

This is PEFT 0.21.2's ia3.Linear (peft/tuners/ia3/layer.py) for one adapter, with its per-architecture
defaults for `targets: auto` (peft/utils/constants.py, TRANSFORMERS_MODELS_TO_IA3_*_MAPPING). l is
kept in fp32 over a low-precision base; the same random draw PEFT makes before setting it to ones is
made here, so a seed means the same state afterwards on both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import normalise_targets, option
from ..errors import ConfigError, ModelError
from .base import Adapter, adapter_dtype, find_targets, require_linear, set_module

# model_type -> (targets, feed-forward targets): PEFT 0.21.2's defaults for the decoder-only models.
DEFAULT_TARGETS: dict[str, tuple[list[str], list[str]]] = {
    "llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mistral": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    "mixtral": (["k_proj", "v_proj", "w2"], ["w2"]),
    "llama4": (["q_proj", "v_proj", "down_proj"], ["down_proj"]),
    "opt": (["q_proj", "k_proj", "fc2"], ["fc2"]),
    "gptj": (["q_proj", "v_proj", "fc_out"], ["fc_out"]),
    "gpt_neo": (["q_proj", "v_proj", "c_proj"], ["c_proj"]),
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
    "bloom": (["query_key_value", "mlp.dense_4h_to_h"], ["mlp.dense_4h_to_h"]),
}
AUTO = "auto"


@dataclass
class IA3Config:
    """The `ia3:` section."""

    targets: str | list[str] = option(
        "auto", "modules whose output (or input, see feedforward) is rescaled: auto (PEFT's per-architecture "
        "defaults; Llama: k_proj, v_proj, down_proj), a list of names, or a regex over module paths")
    feedforward: str | list[str] = option(
        "auto", "targets that are scaled on their input, as the paper's feed-forward layer: auto (Llama: down_proj) "
        "or a list of names among the targets")

    def __post_init__(self) -> None:
        self.targets, self.feedforward = normalise_targets(self.targets), normalise_targets(self.feedforward)


def _matches(path: str, names: Sequence[str]) -> bool:
    return any(path == n or path.endswith("." + n) for n in names)


class IA3Linear(Adapter, method="ia3"):
    """A learned scaling vector on the output of one nn.Linear, or on its input (feedforward=True)."""

    config_cls = IA3Config
    config_section = "ia3"
    title = "IA3 (ia3.*)"
    summary = "learned rescaling vectors"

    @classmethod
    def attach(cls, model: nn.Module, section, tokenizer=None) -> list[str]:
        return inject_ia3(model, section.targets, section.feedforward)

    @classmethod
    def count_parameters(cls, model: nn.Module, section) -> int:
        """One scale per output feature of each target, per input feature of a feed-forward one."""
        layers = [(model.get_submodule(p), ff) for p, ff in _plan(model, section.targets, section.feedforward)]
        return sum(layer.in_features if ff else layer.out_features for layer, ff in layers)

    def __init__(self, base_layer: nn.Linear, feedforward: bool = False) -> None:
        super().__init__(base_layer)
        self.feedforward = feedforward
        n = base_layer.in_features if feedforward else base_layer.out_features
        weight = base_layer.weight
        torch.randn(n)  # PEFT draws a random vector before setting it to ones: keep the RNG in step
        device = weight.device if weight.device.type != "meta" else None
        self.scale = nn.Parameter(torch.ones(n, dtype=adapter_dtype(weight.dtype), device=device))

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.scale]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base_layer(x)
        if self.feedforward:
            return self.base_layer((x.to(self.scale.dtype) * self.scale).to(x.dtype))
        result = self.base_layer(x)
        return (result * self.scale).to(result.dtype)

    @torch.no_grad()
    def _rescale(self, invert: bool) -> None:
        base = self.base_layer
        if not base.weight.dtype.is_floating_point:
            raise ModelError(f"cannot merge IA3 into a {base.weight.dtype} (quantized) base weight; load the base "
                             "in bf16/fp32 to merge, or keep the adapter unmerged")
        scale = self.scale.to(base.weight.device)
        factor = 1 / scale if invert else scale
        shaped = factor.view(1, -1) if self.feedforward else factor.view(-1, 1)  # (1, in) or (out, 1)
        base.weight.copy_(base.weight * shaped)
        if not self.feedforward and base.bias is not None:
            base.bias.copy_(base.bias * factor)

    def merge(self) -> None:
        """W <- diag(l) W (output scaling, bias too) or W <- W diag(l) (feed-forward input scaling)."""
        if not self.merged:
            self._rescale(invert=False)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._rescale(invert=True)
            self.merged = False

    def extra_repr(self) -> str:
        return f"{'input' if self.feedforward else 'output'} scaling ({self.scale.numel()},), merged={self.merged}"


def default_targets(model: nn.Module) -> tuple[list[str], list[str]]:
    """PEFT's IA3 targets for this model's architecture, read from `model.config.model_type`."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        raise ConfigError(f"ia3 has no default targets for model type {model_type!r}; set ia3.targets and "
                          f"ia3.feedforward (known defaults: {', '.join(sorted(DEFAULT_TARGETS))})")
    targets, feedforward = DEFAULT_TARGETS[model_type]
    return list(targets), list(feedforward)


def inject_ia3(model: nn.Module, targets: str | Sequence[str] = AUTO,
               feedforward: str | Sequence[str] = AUTO) -> list[str]:
    """Wrap every target Linear in an IA3Linear; those matching `feedforward` scale their input.

    `auto` takes PEFT's per-architecture defaults. Feed-forward names must be among the targets (as PEFT
    requires). Returns the adapted paths in module order; trainability is left alone.
    """
    plan = _plan(model, targets, feedforward)
    paths = [p for p, _ in plan]
    require_linear(model, paths, "ia3")
    for path, ff in plan:
        set_module(model, path, IA3Linear(model.get_submodule(path), feedforward=ff))
    return paths


def _plan(model: nn.Module, targets, feedforward) -> list[tuple[str, bool]]:
    """(path, scaled on its input) for every target, in module order, with `auto` resolved."""
    auto_targets, auto_ff = default_targets(model) if AUTO in (targets, feedforward) else ([], [])
    targets = auto_targets if targets == AUTO else targets
    feedforward = auto_ff if feedforward == AUTO else ([feedforward] if isinstance(feedforward, str) else feedforward)
    paths = find_targets(model, targets, key="ia3.targets")
    stray = [n for n in feedforward if not any(_matches(p, [n]) for p in paths)]
    if stray:
        raise ConfigError(f"ia3.feedforward {stray} are not among the modules ia3.targets adapts; add them to "
                          "ia3.targets or drop them from ia3.feedforward")
    return [(p, _matches(p, feedforward)) for p in paths]
