"""LoRA and DoRA adapters on disk in PEFT's format, so PEFT, vLLM and TGI load ours and we load theirs.

A PEFT LoRA adapter is a folder of two files:
  adapter_config.json         the LoraConfig fields (peft_type "LORA", r, lora_alpha, target_modules, ...)
  adapter_model.safetensors   base_model.model.<module path>.lora_A.weight   (r, in)
                              base_model.model.<module path>.lora_B.weight   (out, r)
A DoRA adapter is the same with `use_dora: true` and one more tensor per module:
                              base_model.model.<module path>.lora_magnitude_vector   (out,)
The update is s * B @ A with s = lora_alpha / r, or lora_alpha / sqrt(r) when use_rslora is set
(see leantune/adapters/lora.py). We write the field set of PEFT 0.21 with its defaults; older PEFT
versions drop the fields they don't know, with a warning. PEFT is never imported here: the tests
compare against it live.

Loading reads safetensors only (never pickle) and builds the adapters from the weight keys, the record
of what was trained. Config fields that would change the computation (DoRA, per-module ranks, ...)
are refused by name rather than loaded wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..adapters.base import ALL_LINEAR, Adapter, _inside_adapters, adapter_modules, set_module
from ..adapters.dora import DoraLinear
from ..adapters.lora import LoraLinear
from ..errors import ModelError
from ..io.atomic import save_safetensors, write_json

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
PEFT_FORMAT_VERSION = "0.21.2"  # the PEFT release whose LoraConfig field set and defaults we write

# PEFT 0.21's LoraConfig fields at their defaults; save_adapter fills in the ones a run decides.
PEFT_LORA_DEFAULTS: dict[str, Any] = {
    "alora_invocation_tokens": None, "alpha_pattern": {}, "arrow_config": None, "auto_mapping": None,
    "base_model_name_or_path": None, "bias": "none", "corda_config": None, "ensure_weight_tying": False,
    "eva_config": None, "exclude_modules": None, "fan_in_fan_out": False, "inference_mode": True,
    "init_lora_weights": True, "kasa_config": None, "layer_replication": None, "layers_pattern": None,
    "layers_to_transform": None, "loftq_config": {}, "lora_alpha": 8, "lora_bias": False, "lora_dropout": 0.0,
    "lora_ga_config": None, "megatron_config": None, "megatron_core": "megatron.core", "modules_to_save": None,
    "monteclora_config": None, "peft_type": "LORA", "peft_version": PEFT_FORMAT_VERSION, "qalora_group_size": 16,
    "r": 8, "rank_pattern": {}, "revision": None, "target_modules": None, "target_parameters": None,
    "task_type": "CAUSAL_LM", "trainable_token_indices": None, "use_bdlora": None, "use_dora": False,
    "use_qalora": False, "use_rslora": False, "velora_config": None,
}

# Fields that change what the adapter computes or which weights it needs: loading such an adapter as
# plain LoRA would give wrong outputs without a word, so each is refused by name.
UNSUPPORTED = {
    "lora_bias": "a LoRA bias (lora_bias)", "alpha_pattern": "per-module alphas (alpha_pattern)",
    "rank_pattern": "per-module ranks (rank_pattern)", "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)",
    "modules_to_save": "fully trained modules (modules_to_save)", "trainable_token_indices": "trainable tokens",
    "layer_replication": "layer replication", "target_parameters": "LoRA on parameters (target_parameters)",
    "use_qalora": "QA-LoRA", "use_bdlora": "BD-LoRA", "arrow_config": "Arrow routing",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)", "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA", "kasa_config": "KaSA",
}
# These inits rewrite the base weights (W_res = W - BA), so the adapter only fits the rewritten base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")

KEY_RE = re.compile(r"^(?P<path>.+)\.(?:(?P<factor>lora_A|lora_B)(?:\.default)?\.weight"
                    r"|(?P<magnitude>lora_magnitude_vector)(?:\.default\.weight)?)$")
MAGNITUDE = "lora_magnitude_vector"


def _one_value(values: set, given: Any, field: str) -> Any:
    if len(values) > 1:
        raise ModelError(f"the adapters differ in {field} ({sorted(values)}), which leantune does not save "
                         f"(PEFT's rank_pattern/alpha_pattern); inject them all with one {field}")
    (value,) = values
    if given is not None and float(given) != float(value):
        raise ModelError(f"save_adapter was told {field}={given} but the adapters have {value}; pass the values "
                         "they were injected with")
    return value


def target_modules(model, adapted: list[str], targets: str | Sequence[str] | None) -> str | list[str]:
    """What to write as target_modules: the regex, or the sorted leaf names, so long as PEFT's matching
    of it over a fresh base finds exactly the adapted modules; otherwise the full paths."""
    inside = _inside_adapters(model)
    paths = [p for p, _ in model.named_modules() if p and p not in inside]
    wanted = set(adapted)
    if isinstance(targets, str) and targets.lower() != ALL_LINEAR:
        if {p for p in paths if re.fullmatch(targets, p)} == wanted:
            return targets
    leaves = sorted({p.rsplit(".", 1)[-1] for p in adapted})
    if {p for p in paths if any(p == n or p.endswith("." + n) for n in leaves)} == wanted:
        return leaves
    return sorted(adapted)


def save_adapter(model, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                 rank: int | None = None, alpha: float | None = None, dropout: float | None = None,
                 targets: str | Sequence[str] | None = None, rslora: bool | None = None) -> Path:
    """Write the model's LoRA (or DoRA) adapters as a PEFT adapter folder; return it.

    rank/alpha/dropout/rslora default to the adapters' own values; when given they must agree with them.
    `targets` (what the run asked for) decides between writing a regex and a list of module names.
    """
    adapters = adapter_modules(model)
    if not adapters:
        raise ModelError(f"{type(model).__name__} has no adapters to save; inject_lora (or load_adapter) first")
    methods = sorted({a.method for a in adapters.values()})
    if methods not in (["lora"], ["dora"]):
        raise ModelError(f"this PEFT LoRA writer saves lora or dora adapters, one kind per folder; this model holds "
                         f"{', '.join(methods)} (leantune.checkpoint.adapter_io.save_adapter picks the writer)")
    use_dora = methods == ["dora"]
    found = list(adapters.values())
    r = _one_value({a.rank for a in found}, rank, "rank")
    lora_alpha = _one_value({a.alpha for a in found}, alpha, "alpha")
    lora_dropout = _one_value({float(getattr(a.dropout, "p", 0.0)) for a in found}, dropout, "dropout")
    use_rslora = bool(_one_value({bool(a.rslora) for a in found}, rslora, "rslora"))
    init = {a.init for a in found}

    config = dict(PEFT_LORA_DEFAULTS)
    config.update(
        base_model_name_or_path=None if base_model_name_or_path is None else str(base_model_name_or_path),
        r=r, lora_alpha=int(lora_alpha) if float(lora_alpha).is_integer() else float(lora_alpha),
        lora_dropout=float(lora_dropout), use_rslora=use_rslora, use_dora=use_dora,
        init_lora_weights="gaussian" if init == {"gaussian"} else True,
        target_modules=target_modules(model, list(adapters), targets),
    )
    tensors = {}
    for path, a in adapters.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.lora_A.weight.detach().cpu()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = a.lora_B.weight.detach().cpu()
        if use_dora:
            tensors[f"{PREFIX}{path}.{MAGNITUDE}"] = a.magnitude.detach().cpu()
    out = Path(out_dir)
    # Weights first, config last: readers (PEFT included) open the config first, so a folder that has
    # one has both.
    save_safetensors(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json(out / CONFIG_NAME, config)
    return out


# ---------------------------------------------------------------------------------------------
# Loading


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


def check_config(config: dict, where: Path) -> None:
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise ModelError(f"{where} is not a LoRA adapter: leantune loads LoRA adapters; this one is {peft_type}")
    for field, what in UNSUPPORTED.items():
        if config.get(field):
            raise ModelError(f"{where} uses {what}, which leantune does not load; use PEFT for this adapter, "
                             "or retrain it as plain LoRA")
    if config.get("bias", "none") != "none":
        raise ModelError(f"{where} also trains base biases (bias={config['bias']!r}), which leantune does not load")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise ModelError(f"{where} was initialised with {init}, which rewrites the base weights, so it does not fit the "
                         "original base; save it from PEFT with path_initial_model_for_weight_conversion and load that")
    r = config.get("r")
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ModelError(f"{where}: r must be a positive integer, got {r!r}; the adapter config is damaged")
    if not isinstance(config.get("lora_alpha"), (int, float)):
        raise ModelError(f"{where}: lora_alpha must be a number, got {config.get('lora_alpha')!r}")


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


def _factors_by_module(weights: dict, where: Path, use_dora: bool = False) -> dict[str, dict]:
    """{module path: {"lora_A": tensor, "lora_B": tensor[, MAGNITUDE: tensor]}} from PEFT's (or our) key names."""
    by_module: dict[str, dict] = {}
    for key, tensor in weights.items():
        m = KEY_RE.match(key)
        if m is None or (m["magnitude"] and not use_dora):
            raise ModelError(f"{where} holds {key!r}, which is not a LoRA A/B weight (or a DoRA magnitude with "
                             "use_dora); leantune loads LoRA and DoRA on Linear layers (no embedding LoRA or saved modules)")
        path = m["path"].removeprefix(PREFIX)
        by_module.setdefault(path, {})[m["factor"] or MAGNITUDE] = tensor
    for path, parts in by_module.items():
        if "lora_A" not in parts or "lora_B" not in parts:
            raise ModelError(f"{where} has {next(iter(parts))} but not its partner for {path}; the file is incomplete")
        if use_dora and MAGNITUDE not in parts:
            raise ModelError(f"{where} has no {MAGNITUDE} for {path}, which a DoRA adapter (use_dora) needs; "
                             "the file is incomplete")
    if not by_module:
        raise ModelError(f"{where} holds no LoRA weights; re-save the adapter")
    return by_module


def _fitting_paths(model, by_module: dict[str, dict], r: int, config: dict) -> list[str]:
    """The adapted module paths in model order, once each is known to be a Linear of the right shape."""
    from torch import nn

    base = config.get("base_model_name_or_path")
    different = f"adapter was trained for a different base{f' (it was trained on {base})' if base else ''}"
    modules = dict(model.named_modules())
    missing = sorted(p for p in by_module if p not in modules)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelError(f"{different}: this {type(model).__name__} has no module {missing[0]}{more}")
    order = [p for p in modules if p in by_module]
    for path in order:
        module = modules[path]
        if isinstance(module, Adapter):
            raise ModelError(f"{path} already holds a {module.method} adapter; load into a fresh base model, or "
                             "unload(model) first")
        if not isinstance(module, nn.Linear):
            raise ModelError(f"{different}: {path} is a {type(module).__name__} here, not a Linear layer")
        a, b = by_module[path]["lora_A"], by_module[path]["lora_B"]
        if tuple(a.shape) != (r, module.in_features) or tuple(b.shape) != (module.out_features, r):
            raise ModelError(f"{different}: {path} has A {tuple(a.shape)} and B {tuple(b.shape)}, but with r={r} "
                             f"this layer needs A {(r, module.in_features)} and B {(module.out_features, r)}")
        m = by_module[path].get(MAGNITUDE)
        if m is not None and tuple(m.shape) != (module.out_features,):
            raise ModelError(f"{different}: {path} has a DoRA magnitude of shape {tuple(m.shape)}, this layer needs "
                             f"({module.out_features},)")
    return order


def read_lora(adapter_dir: str | Path) -> tuple[dict, dict[str, dict]]:
    """(checked config, {module path: {"lora_A": (r, in), "lora_B": (out, r)[, magnitude: (out,)]}}) of a
    LoRA or DoRA adapter folder."""
    d = Path(adapter_dir)
    config = read_config(d)
    check_config(config, d / CONFIG_NAME)
    return config, _factors_by_module(read_weights(d), d / WEIGHTS_NAME, bool(config.get("use_dora")))


def load_adapter(model, adapter_dir: str | Path) -> dict:
    """Inject a PEFT LoRA or DoRA adapter (ours or PEFT's) into `model` and load its weights; return its config.

    Every check runs before the model is touched, and the global RNG is left as it was (injection
    draws an init that the loaded weights replace).
    """
    import torch

    config, by_module = read_lora(adapter_dir)
    use_dora = bool(config.get("use_dora"))
    r = config["r"]
    order = _fitting_paths(model, by_module, r, config)
    cls = DoraLinear if use_dora else LoraLinear
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        for path in order:
            lora = cls(model.get_submodule(path), r, config["lora_alpha"],
                       float(config.get("lora_dropout") or 0.0), rslora=bool(config.get("use_rslora", False)))
            lora.lora_A.weight.copy_(by_module[path]["lora_A"])
            lora.lora_B.weight.copy_(by_module[path]["lora_B"])
            if use_dora:
                lora.magnitude.copy_(by_module[path][MAGNITUDE])
            lora.train(model.training)  # a new module trains by default; take the model's mode
            set_module(model, path, lora)
    return config
