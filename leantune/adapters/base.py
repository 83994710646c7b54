"""Adapters: small trainable modules wrapped around frozen layers, found and applied by module path.

An adapter takes the place of one module of the model (`parent.q_proj = LoraLinear(q_proj, ...)`) and
keeps the original as `base_layer`, so the base weights keep their state-dict keys (`...q_proj.base_layer.weight`,
as in PEFT) and the model code never learns that anything changed. Each method is one `Adapter` subclass
that registers itself by name:

    class LoraLinear(Adapter, method="lora"): ...     # ADAPTERS["lora"] is LoraLinear; nothing else to edit

The protocol is four members: `base_layer`, `adapter_parameters()` (what trains), `merge()` / `unmerge()`
(fold the update into the base weight and take it back out, in place) and the `merged` flag. Everything
in this file works through that protocol: the trainable set is the union of `adapter_parameters()`, never
a test on parameter names.

A method is reached from the config through its class: `ADAPTERS[cfg.method].attach(model, section)`,
where `config_section` names the config section it reads (DoRA reads `lora`: it is LoRA plus a magnitude)
and `mergeable` says whether `merge()` can fold it into the base (a bottleneck's nonlinearity can't).

Targets follow PEFT's `target_modules` (peft/tuners/tuners_utils.py, `check_target_module_exists` and
`_maybe_include_all_linear_layers`):
  "all-linear"        every nn.Linear except the output embedding (lm_head)
  ["q_proj", ...]     modules whose path is a name or ends with "." + name
  "regex"             modules whose full path matches the regex (re.fullmatch)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..quant.layers import dequantize

ADAPTERS: dict[str, type[Adapter]] = {}

ALL_LINEAR = "all-linear"


class Adapter(nn.Module):
    """A trainable add-on around one frozen layer. Subclasses register with `method="name"`."""

    method: ClassVar[str]
    config_section: ClassVar[str]
    mergeable: ClassVar[bool] = True
    why_not_mergeable: ClassVar[str] = ""  # the error merge() raises when mergeable is False
    packs: ClassVar[bool] = True  # False: needs one example per row (the prompt goes in front of each)
    base_layer: nn.Module
    merged: bool

    @classmethod
    def attach(cls, model: nn.Module, section, tokenizer=None) -> list[str]:
        """Inject this method into `model` from its config section (a dataclass); return the adapted paths.
        `tokenizer` is there for methods initialised from text (prompt tuning)."""
        raise NotImplementedError

    def extend_inputs(self, inputs: dict, generation: bool = False) -> dict:
        """Change the model's inputs before the forward (prompt and prefix tuning add theirs); most
        methods don't. `generation`: the inputs go to `generate()` rather than to a forward."""
        return inputs

    def __init_subclass__(cls, method: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if method is None:  # an abstract intermediate class
            return
        known = ADAPTERS.get(method)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"adapter method {method!r} is already registered by {known.__qualname__}")
        cls.method = method
        ADAPTERS[method] = cls

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.merged = False

    def adapter_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def merge(self) -> None:
        self._refuse_if_not_mergeable()
        raise NotImplementedError

    def unmerge(self) -> None:
        self._refuse_if_not_mergeable()
        raise NotImplementedError

    def _refuse_if_not_mergeable(self) -> None:
        if not self.mergeable:
            raise ModelError(self.why_not_mergeable)


# ---------------------------------------------------------------------------------------------
# What an adapter may ask of the layer it wraps: sizes and, when there is one, the float dtype of its
# weight. A quantized base (bitsandbytes Linear4bit/Linear8bitLt) answers the same questions, so an
# adapter wraps it without knowing it is quantized.


def layer_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like layer; a packed 4-bit weight's shape says neither."""
    return int(layer.in_features), int(layer.out_features)


def float_dtype(layer: nn.Module) -> torch.dtype | None:
    """The dtype of the layer's weight when it holds floats; None when it holds packed integers (quantized)."""
    dtype = layer.weight.dtype
    return dtype if dtype.is_floating_point else None


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The (out, in) float weight the layer multiplies by: its own, or a quantized one dequantized (a fresh
    tensor each call, for methods such as DoRA whose math needs W itself)."""
    if float_dtype(layer) is not None:
        return layer.weight
    return dequantize(layer)  # only reached with a quantized base, so bitsandbytes is there


# ---------------------------------------------------------------------------------------------
# Finding targets


def _inside_adapters(model: nn.Module) -> set[str]:
    """Paths of the modules held by adapters (base_layer, lora_A, ...): never targets themselves."""
    inside = set()
    for path, module in model.named_modules():
        if isinstance(module, Adapter):
            inside.update(f"{path}.{sub}" if path else sub for sub, _ in module.named_modules() if sub)
    return inside


def _leaf(path: str) -> str:
    return path.rsplit(".", 1)[-1]


def _linear_leaf_names(model: nn.Module) -> list[str]:
    inside = _inside_adapters(model)
    return sorted({_leaf(p) for p, m in model.named_modules() if p and p not in inside and isinstance(m, nn.Linear)})


def _output_embedding(model: nn.Module) -> nn.Module | None:
    # Duck-typed so adapters never import model code; HF models answer with lm_head (or its equivalent).
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        return None


def find_targets(model: nn.Module, targets: str | Sequence[str], exclude: Sequence[str] = ("lm_head",),
                 key: str = "lora.targets") -> list[str]:
    """Module paths to adapt, in `model.named_modules()` order (the order PEFT injects in).

    `exclude` (leaf names) and the model's output embedding are left out of "all-linear" only: a list or
    regex that names lm_head explicitly gets it, as in PEFT. `key` is the config key named in errors.
    """
    inside = _inside_adapters(model)
    modules = [(p, m) for p, m in model.named_modules() if p and p not in inside]  # "" is the model itself
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        out = _output_embedding(model)
        found = [p for p, m in modules if isinstance(m, nn.Linear) and m is not out and _leaf(p) not in exclude]
        wanted = "all-linear"
    elif isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ConfigError(f"{key} {targets!r} is not a valid regex ({e}); use all-linear, a list of "
                              "names such as [q_proj, v_proj], or a regex over full module paths") from None
        found = [p for p, _ in modules if pattern.fullmatch(p)]
        wanted = f"regex {targets!r}"
    else:
        names = list(targets)
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"{key} must be all-linear, a regex, or a non-empty list of module names; got {targets!r}")
        found = [p for p, _ in modules if p in names or any(p.endswith("." + n) for n in names)]
        missing = [n for n in names if not any(p == n or p.endswith("." + n) for p in found)]
        if missing and found:  # a typo in one name would otherwise silently adapt less than asked
            raise ModelError(f"{key} {missing} match no module of {type(model).__name__}; its Linear layers "
                             f"are named: {', '.join(_linear_leaf_names(model))}. Fix or drop those names")
        wanted = str(names)
    if not found:
        raise ModelError(f"{key} {wanted} match no module of {type(model).__name__}; its Linear layers are "
                         f"named: {', '.join(_linear_leaf_names(model)) or '(none)'}. Use all-linear or a list of these")
    return found


def require_linear(model: nn.Module, paths: Sequence[str], method: str) -> None:
    """Check that every path is a plain nn.Linear not yet adapted, before anything is changed."""
    for path in paths:
        module = model.get_submodule(path)
        if isinstance(module, Adapter):
            raise ModelError(f"{path} already has a {module.method} adapter; unload(model) first, or start from a "
                             "fresh copy of the base model")
        if not isinstance(module, nn.Linear):
            inner = sorted({_leaf(p) for p, m in module.named_modules() if p and isinstance(m, nn.Linear)})
            hint = f" such as {', '.join(inner)}" if inner else ""
            raise ModelError(f"{method} target {path} is a {type(module).__name__}, not an nn.Linear; {method} adapts "
                             f"Linear layers: target them by name instead{hint}")


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """fp32 master weights over low-precision bases (PEFT's autocast_adapter_dtype); an fp64 base keeps fp64."""
    return torch.float64 if base_dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# The adapters of a model: trainable set, counts, merge, unload


def adapter_modules(model: nn.Module) -> dict[str, Adapter]:
    """{module path: adapter}, in module order."""
    return {p: m for p, m in model.named_modules() if isinstance(m, Adapter)}


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put `module` at `path` ("model.layers.0.self_attn.q_proj"); ModuleList indices work as names."""
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, module)


def mark_only_adapters_trainable(model: nn.Module) -> None:
    """Freeze every parameter, then unfreeze exactly the adapters' own parameters."""
    adapters = adapter_modules(model)
    if not adapters:
        raise ModelError(f"{type(model).__name__} has no adapters to train; inject some first (inject_lora)")
    for p in model.parameters():
        p.requires_grad_(False)
    for adapter in adapters.values():
        for p in adapter.adapter_parameters():
            p.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, parameter) for every parameter that trains, in `named_parameters()` order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _numel(param: torch.Tensor) -> int:
    n = param.numel()
    if n == 0 and hasattr(param, "ds_numel"):  # DeepSpeed ZeRO-3 keeps the real size aside
        n = param.ds_numel
    if param.__class__.__name__ == "Params4bit":  # bitsandbytes packs two 4-bit values per byte
        n *= 2 * (param.element_size() if hasattr(param, "element_size") else 1)
    return n


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts, counted as PEFT's get_nb_trainable_parameters counts them."""
    trainable = total = 0
    for p in model.parameters():
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def format_trainable(model: nn.Module) -> str:
    """The line PEFT's print_trainable_parameters prints."""
    trainable, total = count_parameters(model)
    share = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}"


def prepare_inputs(model: nn.Module, inputs: dict, generation: bool = False) -> dict:
    """The model's forward inputs (input_ids, attention_mask, labels, ...) as the adapters want them.

    The one hook the train step and generation call: a method that changes the inputs (prompt tuning)
    does it here, so neither has a branch per method."""
    for adapter in adapter_modules(model).values():
        if type(adapter).extend_inputs is not Adapter.extend_inputs:  # skip the hundreds of LoRA layers' no-ops
            inputs = adapter.extend_inputs(inputs, generation=generation)
    return inputs


def merge_adapters(model: nn.Module) -> None:
    for adapter in adapter_modules(model).values():
        adapter.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for adapter in adapter_modules(model).values():
        adapter.unmerge()


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Replace every adapter by its base layer: merged into it (merge=True) or restored (merge=False)."""
    for path, adapter in adapter_modules(model).items():
        if merge:
            adapter.merge()
        elif adapter.merged:
            adapter.unmerge()
        set_module(model, path, adapter.base_layer)
    return model
