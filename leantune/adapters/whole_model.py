"""Full and freeze fine-tuning: the model's own weights train, with no adapter; the result is a whole
Hugging Face checkpoint (config, safetensors weights, tokenizer) that `from_pretrained` loads as is.
They are registered methods like the adapters (`Method`, whole_model = True), but add no module.

    method full     every parameter trains
    method freeze   only the last N decoder layers (`freeze.train_last_layers`) and the modules named in
                    `freeze.train_modules` (a name matches a module whose path is it or ends with "." + it,
                    or, failing that, a regex over full paths: [norm], [embed_tokens], ['.*input_layernorm'])

"Freeze tuning" is LLaMA-Factory's name for the old practice of training the top of a network: the last
layers carry the most task-specific features (Yosinski et al. 2014, https://arxiv.org/abs/1411.1792).
The decoder stack is found structurally, never by model class: the ModuleList that holds
`config.num_hidden_layers` blocks. They live with the adapters rather than in train/ because they are
methods like them: one registry, one config section each, one parameter count.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..config import need, option
from ..errors import ModelError
from .base import Method


@dataclass
class FreezeConfig:
    """The `freeze:` section."""

    train_last_layers: int = option(0, "method freeze: train the last N decoder layers (0: none)")
    train_modules: list[str] = option([], "method freeze: also train modules whose path ends with one of these names "
                                      "(e.g. [norm, embed_tokens, lm_head]) or matches them as a regex")


class FullFineTuning(Method, method="full"):
    """Every parameter of the model trains."""

    summary = "every weight trains"
    whole_model = True
    mergeable = False
    why_not_mergeable = "a fully fine-tuned model has nothing held apart to merge: its model/ folder is the result"

    @classmethod
    def prepare(cls, model: nn.Module, section, tokenizer=None) -> list[str]:
        return mark_trainable(model, "full")

    @classmethod
    def count_parameters(cls, model: nn.Module, section) -> int:
        return sum(p.numel() for p in model.parameters())


class FreezeTuning(Method, method="freeze"):
    """The last decoder layers and the named modules train; everything else stays frozen."""

    config_cls = FreezeConfig
    config_section = "freeze"
    title = "freeze tuning (freeze.*)"
    summary = "only the named layers and modules train"
    whole_model = True
    mergeable = False
    why_not_mergeable = FullFineTuning.why_not_mergeable

    @classmethod
    def check(cls, cfg) -> None:
        f = cfg.freeze
        need(f.train_last_layers >= 0, f"freeze.train_last_layers must be >= 0, got {f.train_last_layers}")
        need(cfg.method != "freeze" or f.train_last_layers > 0 or bool(f.train_modules),
             "method freeze trains nothing as configured: set freeze.train_last_layers (e.g. 2) and/or "
             "freeze.train_modules (e.g. [norm])")

    @classmethod
    def prepare(cls, model: nn.Module, section, tokenizer=None) -> list[str]:
        return mark_trainable(model, "freeze", section.train_last_layers, section.train_modules)

    @classmethod
    def count_parameters(cls, model: nn.Module, section) -> int:
        chosen = _chosen(model, section.train_last_layers, section.train_modules)
        params = {id(p): p for path in chosen for p in model.get_submodule(path).parameters()}
        return sum(p.numel() for p in params.values())


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(path, the ModuleList of decoder blocks)."""
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    exact = [(p, m) for p, m in lists if len(m) == n]
    found = exact or sorted(lists, key=lambda pm: -len(pm[1]))
    if not found:
        raise ModelError(f"{type(model).__name__} has no list of decoder layers; freeze.train_last_layers needs one "
                         "(use freeze.train_modules, or method full)")
    return found[0]


def _matching_modules(model: nn.Module, name: str) -> list[str]:
    paths = [p for p, _ in model.named_modules() if p]
    by_name = [p for p in paths if p == name or p.endswith("." + name)]
    if by_name:
        return by_name
    try:
        pattern = re.compile(name)
    except re.error:
        return []
    return [p for p in paths if pattern.fullmatch(p)]


def _module_names(model: nn.Module) -> str:
    leaves = {p.rsplit(".", 1)[-1] for p, m in model.named_modules()
              if p and any(True for _ in m.parameters(recurse=False))}
    return ", ".join(sorted(n for n in leaves if not n.isdigit()))


def mark_trainable(model: nn.Module, method: str, train_last_layers: int = 0,
                   train_modules: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Set requires_grad for method full/freeze; return the module paths that train ("" = everything)."""
    if method == "full":
        model.requires_grad_(True)
        return [""]
    chosen = _chosen(model, train_last_layers, train_modules)
    model.requires_grad_(False)
    for path in chosen:
        model.get_submodule(path).requires_grad_(True)
    return chosen


def _chosen(model: nn.Module, train_last_layers: int, train_modules) -> list[str]:
    """The module paths freeze tuning trains."""
    chosen: list[str] = []
    if train_last_layers:
        path, layers = decoder_layers(model)
        if train_last_layers > len(layers):
            raise ModelError(f"freeze.train_last_layers is {train_last_layers} but {type(model).__name__} has "
                             f"{len(layers)} decoder layers; use 1-{len(layers)}, or method full to train all")
        chosen += [f"{path}.{i}" for i in range(len(layers) - train_last_layers, len(layers))]
    for name in train_modules:
        found = _matching_modules(model, name)
        if not found:
            raise ModelError(f"freeze.train_modules {name!r} matches no module of {type(model).__name__}; modules "
                             f"with weights are named: {_module_names(model)}")
        chosen += found
    return chosen


def save_model(model: nn.Module, tokenizer, folder: Path) -> None:
    """A loadable HF folder: weights as safetensors, config with the cache on again, the tokenizer."""
    use_cache = model.config.use_cache
    model.config.use_cache = True  # training turned it off; generation wants it back
    try:
        model.save_pretrained(folder, safe_serialization=True)
    finally:
        model.config.use_cache = use_cache
    tokenizer.save_pretrained(folder)
