"""The train config: one YAML file, typed and validated, every field overridable on the command line.

The schema is a tree of dataclasses. Each field carries its help text in `metadata["help"]`, so the
same definition drives validation, `leantune train --help` and the resolved `config.yaml` saved into
every run folder. Validation is strict: an unknown key is an error that names the closest valid key
("did you mean lora.rank?"), and a value of the wrong type names the type it should have.

No heavy imports here: the CLI builds its help from this module in milliseconds.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import ConfigError


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class SourceConfig:
    """One dataset of a mix (data.sources); unset fields take the value of the data section."""

    path: str | None = _f(None, "a data file (.jsonl/.json/.csv/.parquet/.txt) or a hub dataset id")
    weight: float | None = _f(None, "share of the training mix, relative to the other sources' weights "
                                    "(give every source a weight, or none: then each is used once)")
    format: Literal["auto", "alpaca", "chat", "prompt_completion", "text"] | None = _f(
        None, "this source's record format (default: data.format)")
    split: str | None = _f(None, "split to read when `path` is a hub dataset (default: data.split)")
    fields: dict[str, str] = _f({}, "rename fields before the format is read: {format field: record field}, "
                                    "e.g. {instruction: question, output: answer}")


@dataclass
class DataConfig:
    path: str | list[str] | None = _f(
        None, "training data: a .jsonl/.json/.csv/.parquet file, a .txt file (one example per blank-line-separated "
        "paragraph, trained as raw text), a hub dataset id (online only), or a list of these (each used once)")
    sources: list[SourceConfig] = _f(
        [], "several datasets mixed by weight, instead of `path`: a list of {path, weight, format, split, fields}; "
        "see README 'Data'")
    format: Literal["auto", "alpaca", "chat", "prompt_completion", "text"] = _f(
        "auto", "record format; auto detects it from the fields of the first record")
    split: str = _f("train", "split to read when `path` is a hub dataset")
    eval_path: str | None = _f(None, "held-out data file; when unset, `eval_fraction` of each source is held out")
    eval_fraction: float = _f(0.05, "fraction of the training examples held out for eval when there is no eval_path (0 disables)")
    max_length: int = _f(1024, "longest example in tokens; longer ones are truncated or skipped (see `overlong`)")
    overlong: Literal["truncate", "skip"] = _f("truncate", "what to do with examples longer than max_length (both are counted and reported)")
    packing: bool = _f(True, "pack several examples per row; examples never attend to each other")
    train_on_prompt: bool = _f(False, "also train on prompt/system/user tokens (default: responses only)")
    system_prompt: str | None = _f(None, "system message added to chat/alpaca examples that have none")
    chat_template: str | None = _f(None, "a Jinja chat template (inline or a file path) to use instead of the tokenizer's")
    cache: bool = _f(True, "use the tokenized data that `leantune preprocess` wrote, when its key (file contents, "
                           "tokenizer, data settings) matches; a stale cache is never used")
    cache_dir: str | None = _f(None, "folder of the tokenized-data cache (null: $LEANTUNE_CACHE/data, "
                                     "default ~/.cache/leantune/data)")


@dataclass
class LoraConfig:
    rank: int = _f(16, "LoRA rank r; typical 8-64")
    alpha: float = _f(32.0, "LoRA alpha; the update is scaled by alpha/rank (alpha/sqrt(rank) with rslora)")
    dropout: float = _f(0.0, "dropout on the LoRA input")
    targets: str | list[str] = _f(
        "all-linear", "modules to adapt: all-linear (every nn.Linear but lm_head), a list of names "
        "such as [q_proj, v_proj], or a regex over full module paths")
    rslora: bool = _f(False, "rank-stabilised LoRA: scale by alpha/sqrt(rank) (Kalajdzievski 2023)")
    lr_ratio: float | None = _f(None, "LoRA+: learning rate of B = lr * lr_ratio (Hayou et al. 2024 suggest 16)")
    init: Literal["default", "gaussian", "loftq"] = _f(
        "default", "A init: PEFT's kaiming-uniform (default) or gaussian, B at zero; loftq (4-bit base only): A and B "
        "start at the rank-r SVD of the quantization error, so the model starts nearer its 16-bit self")


@dataclass
class IA3Config:
    targets: str | list[str] = _f(
        "auto", "modules whose output (or input, see feedforward) is rescaled: auto (PEFT's per-architecture "
        "defaults; Llama: k_proj, v_proj, down_proj), a list of names, or a regex over module paths")
    feedforward: str | list[str] = _f(
        "auto", "targets that are scaled on their input, as the paper's feed-forward layer: auto (Llama: down_proj) "
        "or a list of names among the targets")


@dataclass
class BottleneckConfig:
    style: Literal["houlsby", "pfeiffer"] = _f(
        "houlsby", "houlsby: adapters after attention and after the feed-forward; pfeiffer: after the feed-forward only")
    size: int = _f(64, "bottleneck width: the down-projection's output size (AdapterHub: hidden / reduction_factor)")
    activation: Literal["relu", "gelu", "silu", "tanh"] = _f("relu", "nonlinearity between the down- and up-projection")
    attention: list[str] = _f(["self_attn"], "names of the attention sublayers an adapter follows (houlsby)")
    ffn: list[str] = _f(["mlp"], "names of the feed-forward sublayers an adapter follows")


@dataclass
class PromptConfig:
    virtual_tokens: int = _f(20, "virtual tokens prepended to every input (the paper uses 20-100)")
    init: Literal["random", "text"] = _f("random", "start the virtual tokens at random, or at the embeddings of init_text")
    init_text: str | None = _f(None, "text whose token embeddings start the prompt (repeated or cut to virtual_tokens)")


@dataclass
class PrefixConfig:
    virtual_tokens: int = _f(20, "key/value prefix length in every layer (the paper uses 10-200)")
    projection: bool = _f(False, "produce the prefixes through an MLP (the paper's reparameterisation; PEFT's prefix_projection)")
    projection_hidden: int | None = _f(None, "hidden width of that MLP (null: the key/value width)")


@dataclass
class TrainConfig:
    epochs: float = _f(1.0, "passes over the training data (ignored when max_steps is set)")
    max_steps: int | None = _f(None, "optimizer steps to run; overrides epochs")
    batch_size: int = _f(4, "rows per micro-batch")
    grad_accum: int = _f(1, "micro-batches per optimizer step; the loss is normalised by the label tokens of all of them")
    lr: float = _f(2e-4, "peak learning rate")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    betas: list[float] = _f([0.9, 0.999], "AdamW betas")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "adafactor", "sgd", "galore_adamw"] = _f(
        "adamw", "adamw (torch), adamw_8bit / paged_adamw_8bit / paged_adamw (bitsandbytes; paging needs CUDA), "
        "adafactor (torch), sgd, or galore_adamw (low-rank gradient projection; for method full/freeze)")
    momentum: float = _f(0.0, "SGD momentum (optimizer sgd only)")
    schedule: Literal["cosine", "linear", "constant"] = _f("cosine", "learning-rate schedule after warmup")
    warmup_steps: int | None = _f(None, "linear warmup steps; when unset, warmup_ratio of the run")
    warmup_ratio: float = _f(0.03, "warmup as a fraction of the total steps")
    max_grad_norm: float | None = _f(1.0, "clip the gradient norm to this (null disables)")
    gradient_checkpointing: bool = _f(False, "recompute activations in the backward pass: less memory, ~30% slower")
    loss_chunk: int = _f(256, "tokens per chunk of the cross-entropy; full-vocabulary fp32 logits never exist for the whole batch")
    eval_every: int = _f(50, "evaluate held-out loss every N steps (0: only at the end)")
    eval_batches: int | None = _f(None, "cap on eval micro-batches per evaluation (null: the whole eval set)")
    save_every: int = _f(100, "write a resumable checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "how many step checkpoints to keep (0 keeps all; the final adapter is always kept)")
    early_stopping_patience: int | None = _f(None, "stop after this many evaluations without a better eval loss")
    log_every: int = _f(1, "write metrics every N steps (0 means every step)")
    tensorboard: bool = _f(True, "also write TensorBoard event files (needs the tensorboard package)")
    progress: bool = _f(True, "show a progress bar")


@dataclass
class GaloreConfig:
    rank: int = _f(128, "GaLore: rank r of the projected gradient of each 2-D weight")
    update_proj_gap: int = _f(200, "GaLore: recompute the projection by SVD every T optimizer steps")
    scale: float = _f(0.25, "GaLore: scale alpha of the projected-back update")


@dataclass
class FreezeConfig:
    train_last_layers: int = _f(0, "method freeze: train the last N decoder layers (0: none)")
    train_modules: list[str] = _f([], "method freeze: also train modules whose path ends with one of these names "
                                  "(e.g. [norm, embed_tokens, lm_head]) or matches them as a regex")


@dataclass
class QuantConfig:
    bits: int | None = _f(None, "quantize the frozen base through bitsandbytes: 4 (QLoRA, NF4/FP4) or 8 (LLM.int8); "
                                "null keeps it in `dtype`. Embeddings, lm_head and norms stay high precision")
    type: Literal["nf4", "fp4"] = _f("nf4", "4-bit code: nf4 (normal-float, QLoRA's choice) or fp4")
    double_quant: bool = _f(True, "4-bit: quantize the block scales too (about 4.13 instead of 4.5 bits per weight)")
    compute_dtype: Literal["auto", "bf16", "fp32", "fp16"] = _f(
        "auto", "dtype of the 4-bit matmuls: auto follows the `dtype` rule (bf16 where the hardware runs it fast, "
        "else fp32); fp16 only on CUDA")
    blocksize: int = _f(64, "4-bit: weights per block scale (64, as QLoRA and transformers)")


QUANT_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' blockwise kernels take


@dataclass
class RunConfig:
    model: str | None = _f(None, "base model: a local HF folder, a hub id, or a .gguf file")
    output_dir: str = _f("runs/leantune", "run folder: resolved config, metrics, checkpoints and the final adapter")
    method: Literal["lora", "dora", "ia3", "bottleneck", "prompt", "prefix", "full", "freeze"] = _f(
        "lora", "fine-tuning method: lora, dora (LoRA on the weight's direction plus a magnitude; reads lora.*), "
        "ia3 (learned rescaling vectors; ia3.*), bottleneck (residual adapter MLPs; bottleneck.*), "
        "prompt (trainable virtual tokens in front of the input; prompt.*), prefix (trainable key/value prefixes in "
        "every layer; prefix.*), full (every weight trains), freeze (only the parts named in freeze.*); "
        "prompt and prefix turn data.packing off")
    seed: int = _f(0, "random seed (data order, init, dropout)")
    dtype: Literal["auto", "bf16", "fp32"] = _f(
        "auto", "dtype of the frozen base weights: auto picks bf16 where the hardware runs it fast, else fp32 (never fp16 on CPU)")
    device: Literal["auto", "cpu", "cuda"] = _f("auto", "where to train")
    threads: int | None = _f(None, "CPU threads for torch (null: torch's default)")
    attn_implementation: str = _f("sdpa", "attention kernel passed to transformers (sdpa, eager)")
    trust_remote_code: bool = _f(False, "allow model code from the model folder (only for models you trust)")
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    ia3: IA3Config = field(default_factory=IA3Config)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    prefix: PrefixConfig = field(default_factory=PrefixConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)


# ---------------------------------------------------------------------------------------------
# Introspection: the flat list of (dotted name, type, default, help) drives --help and overrides.


@dataclass(frozen=True)
class FieldInfo:
    name: str  # dotted: "lora.rank"
    type: Any
    default: Any
    help: str


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def fields_of(cls: type = RunConfig, prefix: str = "") -> list[FieldInfo]:
    out: list[FieldInfo] = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.extend(fields_of(tp, f"{prefix}{f.name}."))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        out.append(FieldInfo(prefix + f.name, tp, default, f.metadata.get("help", "")))
    return out


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
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in known and "[" in prefix:  # inside a list item: only its own keys are candidates
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"its keys are {', '.join(known)}"
            raise ConfigError(f"unknown config key '{prefix}{key}'; {hint}")
        if key not in known:
            raise unknown_key_error(f"{prefix}{key}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{prefix}{key}")
    obj = cls(**kwargs)
    if cls is LoraConfig:
        obj.targets = _normalise_targets(obj.targets)
    if cls is IA3Config:
        obj.targets, obj.feedforward = _normalise_targets(obj.targets), _normalise_targets(obj.feedforward)
    return obj


def _normalise_targets(targets: str | list[str]) -> str | list[str]:
    """"q_proj,v_proj" and a bare "q_proj" mean module names, as in a list; other strings are regexes
    (all-linear and auto are keywords)."""
    if isinstance(targets, str) and targets not in ("all-linear", "auto"):
        if "," in targets:
            return [t.strip() for t in targets.split(",") if t.strip()]
        if re.fullmatch(r"[A-Za-z0-9_]+", targets):
            return [targets]
    return targets


def _check_ranges(cfg: RunConfig) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ConfigError(msg)

    need(cfg.model is not None, "model is not set: give a local HF folder, a hub id or a .gguf file (model: path/to/model)")
    need(cfg.data.path is not None or bool(cfg.data.sources),
         "data.path is not set: point it at a .jsonl/.json/.csv/.parquet/.txt file (data: {path: train.jsonl})")
    check_data(cfg.data)
    need(cfg.lora.rank > 0, f"lora.rank must be > 0, got {cfg.lora.rank}; typical values are 8-64")
    need(cfg.lora.alpha > 0, f"lora.alpha must be > 0, got {cfg.lora.alpha}; a common choice is 2 * rank")
    need(0.0 <= cfg.lora.dropout < 1.0, f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    need(cfg.lora.lr_ratio is None or cfg.lora.lr_ratio > 0, f"lora.lr_ratio must be > 0, got {cfg.lora.lr_ratio}")
    need(cfg.lora.lr_ratio is None or cfg.method in ("lora", "dora"),
         f"lora.lr_ratio (LoRA+) sets B's learning rate, which method {cfg.method} does not have; drop it or use lora/dora")
    need(cfg.prompt.virtual_tokens > 0, f"prompt.virtual_tokens must be > 0, got {cfg.prompt.virtual_tokens}; the paper uses 20-100")
    need(cfg.prompt.init != "text" or bool(cfg.prompt.init_text),
         "prompt.init text needs prompt.init_text (e.g. 'Answer the question briefly.'), or use prompt.init random")
    need(cfg.prefix.virtual_tokens > 0, f"prefix.virtual_tokens must be > 0, got {cfg.prefix.virtual_tokens}; the paper uses 10-200")
    need(cfg.prefix.projection_hidden is None or cfg.prefix.projection_hidden > 0,
         f"prefix.projection_hidden must be > 0 or null, got {cfg.prefix.projection_hidden}")
    need(cfg.bottleneck.size > 0, f"bottleneck.size must be > 0, got {cfg.bottleneck.size}; typical values are 16-256")
    need(bool(cfg.lora.targets), "lora.targets is empty: use all-linear or a list such as [q_proj, v_proj]")
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
    for name in ("eval_every", "save_every", "log_every", "keep_checkpoints"):
        need(getattr(t, name) >= 0, f"train.{name} must be >= 0, got {getattr(t, name)}")
    need(0.0 <= t.momentum < 1.0, f"train.momentum must be in [0, 1), got {t.momentum}")
    need(t.optimizer != "galore_adamw" or cfg.method in ("full", "freeze"),
         "train.optimizer galore_adamw projects full weight gradients; use it with method full or freeze "
         "(LoRA is already low-rank: use adamw)")
    need(cfg.galore.rank > 0, f"galore.rank must be > 0, got {cfg.galore.rank}; the paper uses 128-512")
    need(cfg.galore.update_proj_gap >= 1, f"galore.update_proj_gap must be >= 1, got {cfg.galore.update_proj_gap}")
    need(cfg.galore.scale > 0, f"galore.scale must be > 0, got {cfg.galore.scale}; the paper uses 0.25")
    need(cfg.freeze.train_last_layers >= 0, f"freeze.train_last_layers must be >= 0, got {cfg.freeze.train_last_layers}")
    need(cfg.method != "freeze" or cfg.freeze.train_last_layers > 0 or bool(cfg.freeze.train_modules),
         "method freeze trains nothing as configured: set freeze.train_last_layers (e.g. 2) and/or "
         "freeze.train_modules (e.g. [norm])")
    need(cfg.quant.bits is None or cfg.method not in ("full", "freeze"),
         f"method {cfg.method} trains the base weights, which a {cfg.quant.bits}-bit base cannot hold; "
         "drop quant.bits, or use method lora (QLoRA)")
    need(cfg.lora.init != "loftq" or (cfg.quant.bits == 4 and cfg.method == "lora"),
         f"lora.init loftq corrects a 4-bit base's quantization error; this run has method {cfg.method} and quant.bits "
         f"{cfg.quant.bits}: set quant.bits 4 with method lora, or use lora.init default")
    check_quant(cfg.quant)


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
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
