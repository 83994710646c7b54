"""The config's schema: the core sections as dataclasses (each field with its help), the registry the
methods' sections join as their files are imported (`register_method`), and RunConfig, the tree of them all."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal



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
    checkpoint_offload: bool = option(False, "with gradient_checkpointing: keep each checkpointed layer's saved input in "
                                      "(pinned) host memory until its recompute, not on the GPU (Unsloth's offloaded "
                                      "checkpointing: less device memory, a copy each way per layer)")
    kernels: Literal["auto", "torch", "triton"] = option(
        "auto", "fused Triton kernels on CUDA (cross-entropy chunks, RMSNorm, SwiGLU): triton uses them, torch never, "
        "auto = torch until a GPU benchmark shows they pay (docs/benchmarks.md)")
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
