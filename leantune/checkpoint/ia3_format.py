"""IA3 adapters on disk in PEFT's format: PEFT loads ours and we load PEFT's.

  adapter_config.json         the IA3Config fields (peft_type "IA3", target_modules, feedforward_modules, ...)
  adapter_model.safetensors   base_model.model.<module path>.ia3_l    (out, 1), or (1, in) for feed-forward
                                                                      modules, which scale their input
PEFT keeps the vector 2-D so that it broadcasts against the weight; leantune keeps it 1-D and reshapes
here. Which modules are feed-forward is recorded twice, in feedforward_modules and in the vector's shape;
the two must agree.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..adapters.base import adapter_modules, require_linear, set_module
from ..adapters.ia3 import IA3Linear
from ..errors import ModelError
from ..io.atomic import save_safetensors, write_json
from .peft_format import (
    CONFIG_NAME,
    PEFT_FORMAT_VERSION,
    PREFIX,
    WEIGHTS_NAME,
    read_config,
    read_weights,
    target_modules,
)

KEY_SUFFIX = ".ia3_l"

# PEFT 0.21's IA3Config fields at their defaults.
PEFT_IA3_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None, "base_model_name_or_path": None, "exclude_modules": None, "fan_in_fan_out": False,
    "feedforward_modules": None, "inference_mode": True, "init_ia3_weights": True, "modules_to_save": None,
    "peft_type": "IA3", "peft_version": PEFT_FORMAT_VERSION, "revision": None, "target_modules": None,
    "task_type": "CAUSAL_LM",
}


def save_ia3(model, out_dir: str | Path, *, base_model_name_or_path: str | None = None, targets=None) -> Path:
    adapters = adapter_modules(model)
    if not adapters or {a.method for a in adapters.values()} != {"ia3"}:
        raise ModelError(f"save_ia3 writes IA3 adapters only; this model holds "
                         f"{', '.join(sorted({a.method for a in adapters.values()})) or 'none'}")
    targets_out, feedforward = _names(model, adapters, None if targets == "auto" else targets)
    config = dict(PEFT_IA3_DEFAULTS)
    config.update(
        base_model_name_or_path=None if base_model_name_or_path is None else str(base_model_name_or_path),
        target_modules=targets_out, feedforward_modules=feedforward,
    )
    tensors = {}
    for path, a in adapters.items():
        vector = a.scale.detach().cpu()
        tensors[f"{PREFIX}{path}{KEY_SUFFIX}"] = vector.view(1, -1) if a.feedforward else vector.view(-1, 1)
    out = Path(out_dir)
    save_safetensors(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json(out / CONFIG_NAME, config)  # last: a folder with a config is complete
    return out


def _names(model, adapters: dict, targets) -> tuple:
    """target_modules and feedforward_modules as PEFT wants them: feed-forward names among the target
    names (PEFT checks the subset), each matching by suffix exactly the modules meant; else full paths."""
    found = target_modules(model, list(adapters), targets)
    ff_paths = {p for p, a in adapters.items() if a.feedforward}
    ff_leaves = sorted({p.rsplit(".", 1)[-1] for p in ff_paths})
    if isinstance(found, str):  # a regex: PEFT skips the subset check, and paths match one module each
        return found, sorted(ff_paths)
    if set(ff_leaves) <= set(found) and {p for p in adapters if _is_feedforward(p, ff_leaves)} == ff_paths:
        return found, ff_leaves
    return sorted(adapters), sorted(ff_paths)


def _vectors(weights: dict, where: Path) -> dict[str, Any]:
    vectors = {}
    for key, tensor in weights.items():
        if not key.endswith(KEY_SUFFIX) or tensor.ndim != 2 or 1 not in tensor.shape:
            raise ModelError(f"{where} holds {key!r} {tuple(tensor.shape)}, which is not an IA3 vector (ia3_l); "
                             "leantune loads IA3 on Linear layers only")
        vectors[key.removeprefix(PREFIX).removesuffix(KEY_SUFFIX)] = tensor
    if not vectors:
        raise ModelError(f"{where} holds no IA3 vectors; re-save the adapter")
    return vectors


def _is_feedforward(path: str, names) -> bool:
    """PEFT's rule: a regex matches the whole path, a name list matches path endings."""
    if isinstance(names, str):
        return re.fullmatch(names, path) is not None
    return any(path.endswith(n) for n in names or [])


def load_ia3(model, adapter_dir: str | Path) -> dict:
    """Inject a PEFT IA3 adapter (ours or PEFT's) into `model` and load its vectors; return its config."""
    import torch

    d = Path(adapter_dir)
    config = read_config(d)
    if config.get("peft_type") != "IA3":
        raise ModelError(f"{d / CONFIG_NAME} is a {config.get('peft_type')} adapter, not IA3")
    if config.get("modules_to_save") or config.get("fan_in_fan_out"):
        raise ModelError(f"{d / CONFIG_NAME} uses modules_to_save or fan_in_fan_out, which leantune does not load")
    vectors = _vectors(read_weights(d), d / WEIGHTS_NAME)
    modules = dict(model.named_modules())
    missing = sorted(p for p in vectors if p not in modules)
    if missing:
        raise ModelError(f"adapter was trained for a different base: this {type(model).__name__} has no module {missing[0]}")
    order = [p for p in modules if p in vectors]
    require_linear(model, order, "ia3")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for path in order:
            base, vector = modules[path], vectors[path]
            feedforward = _is_feedforward(path, config.get("feedforward_modules"))
            want = (1, base.in_features) if feedforward else (base.out_features, 1)
            if tuple(vector.shape) != want:
                raise ModelError(f"adapter was trained for a different base: {path} has an IA3 vector of shape "
                                 f"{tuple(vector.shape)}, this layer needs {want}")
            adapter = IA3Linear(base, feedforward=feedforward)
            adapter.scale.copy_(vector.flatten())
            adapter.train(model.training)  # a new module trains by default; take the model's mode
            set_module(model, path, adapter)
    return config
