"""From plain data to a checked RunConfig: type coercion, unknown keys answered with the closest valid one
(and the names people bring from PEFT, transformers and Axolotl), range checks, overrides by dotted name."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal

from ..errors import ConfigError
from .schema import DataConfig, METHODS, QUANT_BLOCKSIZES, QuantConfig, RunConfig, SECTIONS, _method_sections
from .fields import _schema, fields_of, type_name


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check (and gently coerce: int -> float, "1e-4" -> float) `value` against the annotation."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(f"{name} must be {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in args:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{name} must be one of {', '.join(map(str, args))}; got {value!r}{hint}")
    if dataclasses.is_dataclass(tp):  # a list item such as data.sources[0]; a bare string is its path
        return _build(tp, {"path": value} if isinstance(value, str) else value, f"{name}.")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping ({{key: value, ...}}), got {value!r}")
        return {_coerce(k, args[0], f"{name} key"): _coerce(v, args[1], f"{name}.{k}") for k, v in value.items()}
    if origin is list:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value] if not isinstance(value, str) else [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be {type_name(tp)}, got {value!r}")
        return [_coerce(v, args[0], f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return _number(value, int, name, "an integer")
    if tp is float:
        return _number(value, float, name, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{name} must be a string, got {value!r}")
    raise ConfigError(f"{name}: unsupported type {tp}")


def _number(value: Any, cast: type, name: str, what: str) -> Any:
    """int/float from a number or a numeric string; never from a bool (yes: True is an int in Python)."""
    if not isinstance(value, bool):
        if isinstance(value, (int, float)) and (cast is float or isinstance(value, int)):
            return cast(value)
        if isinstance(value, str):
            try:
                return cast(value)
            except ValueError:
                pass
    raise ConfigError(f"{name} must be {what}, got {value!r}")


# Names people bring from PEFT, transformers' TrainingArguments and Axolotl.
ALIASES = {
    "learning_rate": "train.lr", "lr_scheduler_type": "train.schedule", "num_train_epochs": "train.epochs",
    "per_device_train_batch_size": "train.batch_size", "micro_batch_size": "train.batch_size",
    "batch": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "gradient_checkpointing": "train.gradient_checkpointing", "max_grad_norm": "train.max_grad_norm",
    "r": "lora.rank", "lora_r": "lora.rank", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
    "target_modules": "lora.targets", "lora_target_modules": "lora.targets", "use_rslora": "lora.rslora",
    "loraplus_lr_ratio": "lora.lr_ratio", "sequence_len": "data.max_length", "max_seq_length": "data.max_length",
    "max_length": "data.max_length", "dataset": "data.path", "datasets": "data.path", "base_model": "model",
    "model_name_or_path": "model", "output": "output_dir",
    "load_in_4bit": "quant.bits: 4", "load_in_8bit": "quant.bits: 8", "bnb_4bit_quant_type": "quant.type",
    "bnb_4bit_use_double_quant": "quant.double_quant", "bnb_4bit_compute_dtype": "quant.compute_dtype",
    "use_dora": "method (method: dora)",
    "peft_type": "method", "feedforward_modules": "ia3.feedforward", "non_linearity": "bottleneck.activation",
    "num_virtual_tokens": "prompt.virtual_tokens", "prompt_tuning_init": "prompt.init",
    "prompt_tuning_init_text": "prompt.init_text", "prefix_projection": "prefix.projection",
    "encoder_hidden_size": "prefix.projection_hidden",
}


def unknown_key_error(name: str) -> ConfigError:
    if not METHODS:  # a library caller built a config before any method registered its section
        return ConfigError(f"unknown config key {name!r}: no fine-tuning method is registered yet; "
                           "`import leantune.adapters` before building a RunConfig")
    names = [fi.name for fi in fields_of()]
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ALIASES:
        return ConfigError(f"unknown config key {name!r}; leantune calls it {ALIASES[leaf]!r}")
    # 1. the same key in another section ("rank" -> "lora.rank"); 2. a typo of a full key
    # ("lora.rnak" -> "lora.rank"); 3. a typo of a key's last part anywhere ("learnig_rate" won't match, "rnak" will).
    close = [n for n in names if n.rsplit(".", 1)[-1] == leaf and n != name][:1]
    close = close or difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    if not close:
        leaf_match = difflib.get_close_matches(leaf, [n.rsplit(".", 1)[-1] for n in names], n=1, cutoff=0.75)
        close = [n for n in names if leaf_match and n.rsplit(".", 1)[-1] == leaf_match[0]][:1]
    hint = f"; did you mean {close[0]!r}?" if close else "; see `leantune train --help` for every key"
    return ConfigError(f"unknown config key {name!r}{hint}")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping of keys to values, got {raw!r}")
    known = {name: tp for name, tp, _, _ in _schema(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known and "[" in prefix:  # inside a list item: only its own keys are candidates
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"its keys are {', '.join(known)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'; {hint}")
        if key not in known:
            raise unknown_key_error(f"{prefix}{key}")
        tp = known[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    if cls is RunConfig:
        sections = _method_sections()
        sections.update({k: kwargs.pop(k) for k in list(kwargs) if k in SECTIONS})
        kwargs["sections"] = sections
    return cls(**kwargs)


def normalise_targets(targets: str | list[str]) -> str | list[str]:
    """"q_proj,v_proj" and a bare "q_proj" mean module names, as in a list; other strings are regexes
    (all-linear and auto are keywords)."""
    if isinstance(targets, str) and targets not in ("all-linear", "auto"):
        if "," in targets:
            return [t.strip() for t in targets.split(",") if t.strip()]
        if re.fullmatch(r"[A-Za-z0-9_]+", targets):
            return [targets]
    return targets


def need(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless `cond`: the one-line range checks of every section use it."""
    if not cond:
        raise ConfigError(msg)


def _check_ranges(cfg: RunConfig) -> None:
    need(cfg.model is not None, "model is not set: give a local HF folder, a hub id or a .gguf file (model: path/to/model)")
    need(cfg.data.path is not None or bool(cfg.data.sources),
         "data.path is not set: point it at a .jsonl/.json/.csv/.parquet/.txt file (data: {path: train.jsonl})")
    check_data(cfg.data)
    need(cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1 or null (torch's default), got {cfg.threads}")
    need(cfg.data.max_length >= 8, f"data.max_length must be >= 8, got {cfg.data.max_length}")
    need(0.0 <= cfg.data.eval_fraction < 1.0, f"data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}")
    t = cfg.train
    need(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    need(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    need(t.lr > 0, f"train.lr must be > 0, got {t.lr}; LoRA usually trains well at 1e-4 to 3e-4")
    need(t.epochs > 0, f"train.epochs must be > 0, got {t.epochs}")
    need(t.max_steps is None or t.max_steps >= 1, f"train.max_steps must be >= 1, got {t.max_steps}")
    need(t.loss_chunk >= 16, f"train.loss_chunk must be >= 16 tokens, got {t.loss_chunk}")
    need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), f"train.betas must be two numbers in [0, 1), got {t.betas}")
    need(t.warmup_steps is None or t.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {t.warmup_steps}")
    need(0.0 <= t.warmup_ratio < 1.0, f"train.warmup_ratio must be in [0, 1), got {t.warmup_ratio}")
    need(t.max_grad_norm is None or t.max_grad_norm > 0, f"train.max_grad_norm must be > 0 or null, got {t.max_grad_norm}")
    need(t.eval_batches is None or t.eval_batches >= 1,
         f"train.eval_batches must be >= 1 or null (the whole eval set), got {t.eval_batches}; to train without "
         "evaluation set data.eval_fraction 0 (and no data.eval_path)")
    for name in ("eval_every", "save_every", "log_every", "keep_checkpoints", "max_nonfinite"):
        need(getattr(t, name) >= 0, f"train.{name} must be >= 0, got {getattr(t, name)}")
    need(0.0 <= t.momentum < 1.0, f"train.momentum must be in [0, 1), got {t.momentum}")
    whole_model = METHODS[cfg.method].whole_model
    need(t.optimizer != "galore_adamw" or whole_model,
         "train.optimizer galore_adamw projects full weight gradients; use it with method "
         f"{' or '.join(m for m, i in METHODS.items() if i.whole_model)} (LoRA is already low-rank: use adamw)")
    need(cfg.galore.rank > 0, f"galore.rank must be > 0, got {cfg.galore.rank}; the paper uses 128-512")
    need(cfg.galore.update_proj_gap >= 1, f"galore.update_proj_gap must be >= 1, got {cfg.galore.update_proj_gap}")
    need(cfg.galore.scale > 0, f"galore.scale must be > 0, got {cfg.galore.scale}; the paper uses 0.25")
    need(cfg.quant.bits is None or not whole_model,
         f"method {cfg.method} trains the base weights, which a {cfg.quant.bits}-bit base cannot hold; "
         "drop quant.bits, or use method lora (QLoRA)")
    for sec in SECTIONS.values():  # every section is checked, whichever method runs: a bad value is bad anywhere
        if sec.check is not None:
            sec.check(cfg)
    check_quant(cfg.quant)
    need(cfg.distributed.timeout_s >= 10, f"distributed.timeout_s must be >= 10 seconds, got {cfg.distributed.timeout_s}")


def check_data(d: DataConfig) -> None:
    """The data section's cross-field rules (the paths themselves are checked when they are read)."""
    if d.path is not None and d.sources:
        raise ConfigError("data.path and data.sources are both set; put every dataset in data.sources "
                          "(a list of {path, weight})")
    if isinstance(d.path, list) and not d.path:
        raise ConfigError("data.path is an empty list; give at least one data file")
    for i, s in enumerate(d.sources):
        if not s.path:
            raise ConfigError(f"data.sources[{i}] has no path; each source needs one (- {{path: train.jsonl}})")
        if s.weight is not None and not s.weight > 0:
            raise ConfigError(f"data.sources[{i}].weight must be > 0, got {s.weight}; drop the source instead of "
                              "weighting it 0")
    weighted = [s.weight is not None for s in d.sources]
    if any(weighted) and not all(weighted):
        missing = ", ".join(f"data.sources[{i}]" for i, w in enumerate(weighted) if not w)
        raise ConfigError(f"{missing} has no weight while other sources have one; give every source a weight "
                          "(shares of the mix), or none (each source used once)")


def check_quant(q: QuantConfig) -> None:
    if q.bits is not None and q.bits not in (4, 8):
        raise ConfigError(f"quant.bits must be 4 or 8 (or null for an unquantized base), got {q.bits}")
    if q.blocksize not in QUANT_BLOCKSIZES:
        raise ConfigError(f"quant.blocksize must be one of {', '.join(map(str, QUANT_BLOCKSIZES))}, got {q.blocksize}; "
                          "64 is QLoRA's")


def from_dict(raw: dict, overrides: dict[str, Any] | None = None, validate: bool = True) -> RunConfig:
    """Build a RunConfig from a parsed YAML mapping plus dotted overrides ({"lora.rank": "8"})."""
    raw = _deepcopy(raw or {})
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    cfg = _build(RunConfig, raw, "")
    if validate:
        _check_ranges(cfg)
    return cfg


def _deepcopy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deepcopy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deepcopy(v) for v in d]
    return d


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    valid = {fi.name for fi in fields_of()}
    if dotted not in valid:
        raise unknown_key_error(dotted)
    node = raw
    parts = dotted.split(".")
    for p in parts[:-1]:
        if node.get(p) is None:  # `lora:` left empty in the file
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise ConfigError(f"{p} must be a mapping in the config file")
    node[parts[-1]] = value
