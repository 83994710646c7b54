"""The train config: one YAML file, typed and validated, every field overridable on the command line.

The schema is a tree of dataclasses. Each field carries its help text in `metadata["help"]`, so the
same definition drives validation, `leantune train --help` and the resolved `config.yaml` saved into
every run folder. The sections of the fine-tuning methods (lora, ia3, freeze, ...) are declared in each
method's own file and registered here as it is imported (`register_method`), with the method names.
Validation is strict: an unknown key is an error that names the closest valid key ("did you mean
lora.rank?"), and a value of the wrong type names the type it should have.

No heavy imports here: the CLI builds its help from this module in milliseconds (the built-in methods'
sections from a light table, leantune/cli/method_help.py, since importing the methods imports torch).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError


def option(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its help text (shown by `leantune train --help`); lists and dicts are copied."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SourceConfig:
    """One dataset of a mix (data.sources); unset fields take the value of the data section."""

    path: str | None = option(None, "a data file (.jsonl/.json/.csv/.parquet/.txt) or a hub dataset id")
    weight: float | None = option(None, "share of the training mix, relative to the other sources' weights "
                                    "(give every source a weight, or none: then each is used once)")
    format: Literal["auto", "alpaca", "chat", "prompt_completion", "text"] | None = option(
        None, "this source's record format (default: data.format)")
    split: str | None = option(None, "split to read when `path` is a hub dataset (default: data.split)")
    fields: dict[str, str] = option({}, "rename fields before the format is read: {format field: record field}, "
                                    "e.g. {instruction: question, output: answer}")


@dataclass
class DataConfig:
    path: str | list[str] | None = option(
        None, "training data: a .jsonl/.json/.csv/.parquet file, a .txt file (one example per blank-line-separated "
        "paragraph, trained as raw text), a hub dataset id (online only), or a list of these (each used once)")
    sources: list[SourceConfig] = option(
        [], "several datasets mixed by weight, instead of `path`: a list of {path, weight, format, split, fields}; "
        "see README 'Data'")
    format: Literal["auto", "alpaca", "chat", "prompt_completion", "text"] = option(
        "auto", "record format; auto detects it from the fields of the first record")
    split: str = option("train", "split to read when `path` is a hub dataset")
    eval_path: str | None = option(None, "held-out data file; when unset, `eval_fraction` of each source is held out")
    eval_fraction: float = option(0.05, "fraction of the training examples held out for eval when there is no eval_path (0 disables)")
    max_length: int = option(1024, "longest example in tokens; longer ones are truncated or skipped (see `overlong`)")
    overlong: Literal["truncate", "skip"] = option("truncate", "what to do with examples longer than max_length (both are counted and reported)")
    packing: bool = option(True, "pack several examples per row; examples never attend to each other")
    train_on_prompt: bool = option(False, "also train on prompt/system/user tokens (default: responses only)")
    system_prompt: str | None = option(None, "system message added to chat/alpaca examples that have none")
    chat_template: str | None = option(None, "a Jinja chat template (inline or a file path) to use instead of the tokenizer's")
    cache: bool = option(True, "use the tokenized data that `leantune preprocess` wrote, when its key (file contents, "
                           "tokenizer, data settings) matches; a stale cache is never used")
    cache_dir: str | None = option(None, "folder of the tokenized-data cache (null: $LEANTUNE_CACHE/data, "
                                     "default ~/.cache/leantune/data)")


@dataclass
class TrainConfig:
    epochs: float = option(1.0, "passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = option(None, "optimizer steps to run; overrides epochs")
    batch_size: int = option(4, "rows per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimizer step; the loss is normalised by the label tokens of all of them")
    lr: float = option(2e-4, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    betas: list[float] = option([0.9, 0.999], "AdamW betas")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "adafactor", "sgd", "galore_adamw"] = option(
        "adamw", "adamw (torch), adamw_8bit / paged_adamw_8bit / paged_adamw (bitsandbytes; paging needs CUDA), "
        "adafactor (torch), sgd, or galore_adamw (low-rank gradient projection; for method full/freeze)")
    momentum: float = option(0.0, "SGD momentum (optimizer sgd only)")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "learning-rate schedule after warmup")
    warmup_steps: int | None = option(None, "linear warmup steps; when unset, warmup_ratio of the run")
    warmup_ratio: float = option(0.03, "warmup as a fraction of the total steps")
    max_grad_norm: float | None = option(1.0, "clip the gradient norm to this (null disables)")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, ~30% slower")
    auto_fit: bool = option(False, "before the run, let the planner choose batch_size, grad_accum (same global batch) and "
                            "gradient_checkpointing to fit the device's memory; summary.json records predicted vs measured peak")
    fit_memory: str | None = option(None, "the memory auto_fit sizes for: a size (6GB) or a GPU name; null: this device's "
                                      "(a GPU's total, or the RAM available now on a CPU)")
    compile: bool = option(False, "torch.compile each decoder layer (regional: one layer's compile time, paid in the first step); "
                        "needs Triton on CUDA, a C++ compiler on CPU")
    loss_chunk: int = option(256, "tokens per chunk of the cross-entropy; full-vocabulary fp32 logits never exist for the whole batch")
    eval_every: int = option(50, "evaluate held-out loss every N steps (0: only at the end)")
    eval_batches: int | None = option(None, "cap on eval micro-batches per evaluation, >= 1 (null: the whole eval set)")
    save_every: int = option(100, "write a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = option(2, "how many step checkpoints to keep (0 keeps all; the final adapter is always kept)")
    early_stopping_patience: int | None = option(None, "stop after this many evaluations without a better eval loss")
    log_every: int = option(1, "write metrics every N steps (0 means every step)")
    tensorboard: bool = option(True, "also write TensorBoard event files (needs the tensorboard package)")
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = option(
        ["tensorboard"], "where metrics go beside metrics.jsonl: tensorboard, wandb (offline unless WANDB_MODE or an API key), "
        "mlflow (a file: store in the run folder unless MLFLOW_TRACKING_URI); each needs its package")
    progress: bool = option(True, "show a progress bar")
    on_nonfinite: Literal["stop", "skip_batch", "rollback"] = option(
        "stop", "a NaN/inf loss or gradient: stop (the last checkpoint is kept), skip_batch (drop that step's "
        "batches, no update), or rollback (reload the last checkpoint, go on past the batches since)")
    max_nonfinite: int = option(3, "skip_batch/rollback: stop after this many non-finite steps in a run")


@dataclass
class GaloreConfig:
    rank: int = option(128, "GaLore: rank r of the projected gradient of each 2-D weight")
    update_proj_gap: int = option(200, "GaLore: recompute the projection by SVD every T optimizer steps")
    scale: float = option(0.25, "GaLore: scale alpha of the projected-back update")


@dataclass
class QuantConfig:
    bits: int | None = option(None, "quantize the frozen base through bitsandbytes: 4 (QLoRA, NF4/FP4) or 8 (LLM.int8); "
                                "null keeps it in `dtype`. Embeddings, lm_head and norms stay high precision")
    type: Literal["nf4", "fp4"] = option("nf4", "4-bit code: nf4 (normal-float, QLoRA's choice) or fp4")
    double_quant: bool = option(True, "4-bit: quantize the block scales too (about 4.13 instead of 4.5 bits per weight)")
    compute_dtype: Literal["auto", "bf16", "fp32", "fp16"] = option(
        "auto", "dtype of the 4-bit matmuls: auto follows the `dtype` rule (bf16 where the hardware runs it fast, "
        "else fp32); fp16 only on CUDA")
    blocksize: int = option(64, "4-bit: weights per block scale (64, as QLoRA and transformers)")


@dataclass
class DistributedConfig:
    strategy: Literal["auto", "ddp", "fsdp2"] = option(
        "auto", "how several processes (torchrun) share the work: ddp replicates the model and averages gradients; "
        "fsdp2 shards weights, gradients and optimizer state per decoder layer (fully_shard); auto picks ddp when the "
        "model and its optimizer fit one device, else fsdp2. Ignored in one process")
    timeout_s: int = option(600, "seconds a process waits for the others at a collective before the job fails "
                            "(a rank that dies ends the others sooner: torchrun stops them)")
    reshard_after_forward: bool = option(True, "fsdp2: free each layer's gathered weights after its forward (less "
                                         "memory, one more all-gather in the backward)")


QUANT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' blockwise kernels take


# ---------------------------------------------------------------------------------------------
# Fine-tuning methods and their sections. Each method's own file declares them (leantune/adapters/,
# `Method.__init_subclass__` calls `register_method` as the file is imported), so a new method's section
# reaches RunConfig, `leantune train --help` and the YAML with no edit here. This module sits below the
# methods and imports none of them: whoever builds a RunConfig from a file imports `leantune.adapters`
# first (the CLI, the train loop and the run folder do).


@dataclass(frozen=True)
class MethodInfo:
    name: str
    section: str | None   # the RunConfig section it reads (DoRA reads `lora`); None: it has no settings
    summary: str          # one line for `--help` and errors
    whole_model: bool     # trains the model's own weights (full, freeze) rather than an added adapter


@dataclass(frozen=True)
class Section:
    cls: type                                   # the section's dataclass (LoraConfig lives in adapters/lora.py)
    title: str                                  # its group title in `leantune train --help`
    check: Callable[[Any], None] | None = None  # range checks over the whole RunConfig, raising ConfigError


METHODS: dict[str, MethodInfo] = {}
SECTIONS: dict[str, Section] = {}


def register_method(info: MethodInfo, section: Section | None = None) -> None:
    """Make a method choosable (`method: NAME`) and, when it brings one, its config section known."""
    if section is not None:
        known = SECTIONS.get(info.section)
        if known is not None and known.cls.__qualname__ != section.cls.__qualname__:
            raise TypeError(f"config section {info.section!r} is already declared by {known.cls.__qualname__}")
        if info.section in {f.name for f in dataclasses.fields(RunConfig)}:
            raise TypeError(f"config section {info.section!r} would shadow RunConfig.{info.section}")
        SECTIONS[info.section] = section
    METHODS[info.name] = info


def _method_sections() -> dict[str, Any]:
    return {name: sec.cls() for name, sec in SECTIONS.items()}


@dataclass
class RunConfig:
    model: str | None = option(None, "base model: a local HF folder, a hub id, or a .gguf file")
    output_dir: str = option("runs/leantune", "run folder: resolved config, metrics, checkpoints and the final adapter")
    method: str = option("lora", "fine-tuning method")  # its type and help are built from METHODS (_schema)
    seed: int = option(0, "random seed (data order, init, dropout)")
    dtype: Literal["auto", "bf16", "fp32"] = option(
        "auto", "dtype of the frozen base weights: auto picks bf16 where the hardware runs it fast, else fp32 (never fp16 on CPU)")
    device: Literal["auto", "cpu", "cuda"] = option("auto", "where to train")
    threads: int | None = option(None, "CPU threads for torch, >= 1 (null: torch's default)")
    attn_implementation: str = option("sdpa", "attention kernel passed to transformers (sdpa, eager)")
    trust_remote_code: bool = option(False, "allow model code from the model folder (only for models you trust)")
    deploy_targets: list[Literal["vllm", "llamacpp"]] = option(
        [], "runtimes that must serve the result (vllm, llamacpp): their rules are checked before training starts, "
        "and a conflict (e.g. method dora with vllm) stops the run; `leantune lint` checks a saved adapter")
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    # The registered methods' sections by name (cfg.lora is cfg.sections["lora"]); in the YAML and on the
    # command line they are top-level sections like the others.
    sections: dict[str, Any] = field(default_factory=_method_sections, repr=False)

    def __getattr__(self, name: str) -> Any:  # reached only when no real attribute has the name
        sections = self.__dict__.get("sections")
        if sections is not None and name in sections:
            return sections[name]
        raise AttributeError(f"RunConfig has no field or method section {name!r}")


# ---------------------------------------------------------------------------------------------
# Introspection: the flat list of (dotted name, type, default, help) drives --help and overrides.


@dataclass(frozen=True)
class FieldInfo:
    name: str  # dotted: "lora.rank"
    type: Any
    default: Any
    help: str


def method_help(infos=None) -> str:
    """The `method` field's help: every registered method (or those in `infos`) with its line and section."""
    infos = METHODS.values() if infos is None else infos
    lines = [f"{m.name} ({m.summary}{'; ' + m.section + '.*' if m.section else ''})" for m in infos]
    return "fine-tuning method: " + (", ".join(lines) or "none registered (import leantune.adapters)")


def _schema(cls: type) -> list[tuple[str, Any, Callable[[], Any], str]]:
    """(name, type, default factory, help) of each field of `cls` in order; for RunConfig the method field
    takes its choices from METHODS and the registered sections stand after `data`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if cls is RunConfig and f.name == "sections":
            continue
        tp, help = hints[f.name], f.metadata.get("help", "")
        if cls is RunConfig and f.name == "method" and METHODS:
            tp, help = Literal[tuple(METHODS)], method_help()  # type: ignore[valid-type]
        make = (lambda v=f.default: v) if f.default is not dataclasses.MISSING else f.default_factory
        out.append((f.name, tp, make, help))
        if cls is RunConfig and f.name == "data":
            out += [(name, sec.cls, sec.cls, "") for name, sec in SECTIONS.items()]
    return out


def fields_of(cls: type = RunConfig, prefix: str = "") -> list[FieldInfo]:
    out: list[FieldInfo] = []
    for name, tp, make, help in _schema(cls):
        if dataclasses.is_dataclass(tp):
            out.extend(fields_of(tp, f"{prefix}{name}."))
        else:
            out.append(FieldInfo(prefix + name, tp, make(), help))
    return out


def section_title(name: str) -> str | None:
    """The `--help` group title a method section declares, if `name` is one."""
    sec = SECTIONS.get(name)
    return sec.title if sec is not None else None


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))


# ---------------------------------------------------------------------------------------------
# Validation


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


def load_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist; create one (see README: 'A five-minute tour')")
    if p.is_dir():
        raise ConfigError(f"{str(p)!r} is a folder; pass the YAML config file inside it")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p} is not valid YAML{where}: {getattr(e, 'problem', e)}; fix the syntax there") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not UTF-8 text; save the config as UTF-8 YAML") from None
    if raw is None:
        raise ConfigError(f"{p} is empty; it needs at least `model:` and `data: {{path: ...}}`")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a YAML mapping (key: value lines), not a {type(raw).__name__}")
    return raw


def load(path: str | Path | None, overrides: dict[str, Any] | None = None, validate: bool = True) -> RunConfig:
    raw = load_yaml(path) if path is not None else {}
    if path is not None:
        base = Path(path).resolve().parent
        _resolve_relative(raw, base)
    return from_dict(raw, overrides, validate=validate)


def _resolve_relative(raw: dict, base: Path) -> None:
    """Input paths written in the file are read relative to the file when they exist there
    (output_dir stays relative to the working directory, like every other tool's)."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = base / value
            if candidate.exists():
                return str(candidate)
        return value

    if "model" in raw:
        raw["model"] = fix(raw["model"])
    data = raw.get("data")
    if isinstance(data, dict):
        for k in ("path", "eval_path", "chat_template"):
            if k in data:
                data[k] = [fix(v) for v in data[k]] if isinstance(data[k], list) else fix(data[k])
        if isinstance(data.get("sources"), list):
            data["sources"] = [fix(s) if isinstance(s, str) else s for s in data["sources"]]
            for source in data["sources"]:
                if isinstance(source, dict) and "path" in source:
                    source["path"] = fix(source["path"])


def to_dict(cfg: Any) -> dict:
    """The config as plain data, in the order of `--help`: the method sections are top-level keys."""
    if not isinstance(cfg, RunConfig):
        return dataclasses.asdict(cfg)
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name == "sections":
            continue
        value = getattr(cfg, f.name)
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        if f.name == "data":
            out.update({name: dataclasses.asdict(sec) for name, sec in cfg.sections.items()})
    return out


def dump_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
