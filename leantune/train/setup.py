"""Everything a run needs before its first step, gathered into one `Session` by `setup(cfg)`.

    check deploy_targets and output_dir -> seed, device, dtype -> tokenizer, model -> data -> method -> batch plan, steps
    -> optimizer (and the checkpoint it resumes from) -> config.yaml, data_report.json, metrics log

The checks that need no model come first, so a bad output_dir costs no minutes of loading. The loop
(train/loop.py) then only steps, evaluates and saves through the session; nothing here knows about a step.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers.utils import logging as hf_logging

from ..adapters.base import METHODS, adapter_modules, format_trainable, layer_features
from ..checkpoint.adapter_io import save_adapter
from ..checkpoint.deploy_rules import check_deploy_targets
from ..checkpoint.run_folder import RunFolder, RunInfo, write_run_info
from ..config import RunConfig, dump_yaml, load_yaml, to_dict
from ..data.dataset import EpochPlan, Prepared, batch_plan, build as build_data
from ..data.tokenize import resolve_chat_template
from ..device import pick_dtype, resolve_device
from ..errors import ConfigError
from ..adapters.whole_model import save_model
from ..io.atomic import atomic_dir, write_json, write_text
from ..io.faults import fault_point
from ..models.load import check_vocab, load_model, load_tokenizer, resolve_source
from ..models.quantized import local_model_dir
from ..ops import cross_entropy, triton as triton_kernels
from ..ops.offload import offloaded_checkpoint
from ..quant import spec_of
from . import distributed
from .compile import compile_layers
from .memory import SavedTensorMeter
from .loggers import check_installed as check_trackers
from .metrics import MetricsLog
from .optim import build_optimizer
from .schedule import warmup_steps
from .state import Progress, resume_from, save_checkpoint, verify_saved

class Batches:
    """The training micro-batches in order, from where `progress` points (epoch, index in its plan).

    An epoch's plan is a pure function of (data, seed, epoch), so only the current one is kept and a
    resumed run rebuilds it. Every epoch has as many micro-batches as the first."""

    def __init__(self, cfg: RunConfig, data: Prepared):
        self.cfg, self.data = cfg, data
        # Under torchrun: this process's rows of every micro-batch (train/distributed.py).
        self.epoch, self.plan = 0, distributed.rank_plan(cfg, data.train, data.pad_id, epoch=0)
        self.per_epoch = len(self.plan)

    def next(self, progress: Progress) -> dict:
        if progress.batch_index >= self.per_epoch:
            progress.epoch += 1
            progress.batch_index = 0
        if progress.epoch != self.epoch:
            self.epoch, self.plan = progress.epoch, distributed.rank_plan(self.cfg, self.data.train, self.data.pad_id,
                                                                          epoch=progress.epoch)
        batch = self.plan[progress.batch_index]
        progress.batch_index += 1
        return batch


@dataclass
class Session:
    """A run in progress: what setup() built, then the state the loop moves forward."""

    cfg: RunConfig
    run_dir: Path
    folder: RunFolder  # where each file of the run goes (checkpoint/run_folder.py)
    device: torch.device
    model: Any
    tokenizer: Any
    base_name: str  # what the adapter records as its base (a .gguf base: the HF folder it became)
    info: RunInfo  # the sidecar beside every adapter and checkpoint: how to use it as trained
    batches: Batches
    eval_plan: EpochPlan | list
    total_steps: int
    warmup: int
    optimizer: Any
    log: MetricsLog
    trainable: list  # the parameters that train, for the gradient norm
    # What the loop moves forward (progress is also what a checkpoint saves, train/state.py).
    progress: Progress
    # Measured on this process's first step: saved activations of one micro-batch, and the gradients.
    meter: SavedTensorMeter
    grad_bytes: int = 0
    memory: dict | None = None  # the memory breakdown, after the first step
    in_update: bool = False  # inside optimizer.step(): the weights may be half-updated
    last_loss: float | None = None
    last_eval: float | None = None
    fit: dict | None = None  # train.auto_fit's choice and predicted peak (plan/fit.py), for summary.json

    @property
    def whole_model(self) -> bool:  # full/freeze: the run saves the whole model, not an adapter
        return METHODS[self.cfg.method].whole_model

    def save_adapter_to(self, model, out: Path) -> None:
        write_run_info(out, self.info)
        if self.whole_model:  # a checkpoint's trainable.safetensors already holds every trained weight
            return
        save_adapter(model, out, base_model_name_or_path=self.base_name, config=self.cfg)

    def checkpoint(self) -> Path:
        """Every process calls it (FSDP2 shards are gathered); rank 0 writes."""
        with distributed.gathered(self.model, self.optimizer) as optimizer_state:
            if distributed.is_main():
                save_checkpoint(self.run_dir, self.model, self.optimizer, self.progress, optimizer_state=optimizer_state,
                                save_adapter_fn=self.save_adapter_to, keep=self.cfg.train.keep_checkpoints)
        distributed.barrier()
        return self.folder.checkpoint(self.progress.step)

    def save_final(self, out: Path) -> None:
        """The final adapter (or whole model for full/freeze) into `out`: gathered on every process, written by rank 0."""
        with distributed.gathered(self.model, whole=self.whole_model):
            if distributed.is_main():
                with atomic_dir(out) as tmp:
                    if self.whole_model:
                        save_model(self.model, self.tokenizer, tmp)
                    self.save_adapter_to(self.model, tmp)  # the sidecar; the adapter too, unless the whole model was saved
                    fault_point("final")
                    verify_saved(tmp)  # never report success on an empty or truncated adapter
        distributed.barrier()


def setup(cfg: RunConfig, *, resume: bool = False, console: Callable[[str], None] = print) -> Session:
    """Load, prepare and plan the run of `cfg`; with `resume`, from its newest checkpoint."""
    check_deploy_targets(cfg, console)  # a result vLLM or llama.cpp cannot serve is refused before any loading
    check_trackers(cfg.train.report_to)  # a named W&B/MLflow that is not installed: refused before loading
    run_dir = Path(cfg.output_dir)
    folder = RunFolder(run_dir)
    ckpts = check_run_dir(run_dir, resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = distributed.local_device(resolve_device(cfg.device))
    model, tokenizer, base_name = _load(cfg, device, console)

    unpack_if_needed(cfg, console)
    data = build_data(cfg.data, tokenizer, seed=cfg.seed)
    console(data.report.summary())  # it holds the pad id's note too (data.pad_id, chosen once there)
    check_positions(cfg, model, data)

    attach_method(model, cfg, tokenizer, console)
    check_rank(model)
    model.to(device)
    console(format_trainable(model))
    model.train()
    use_kernels(model, cfg, device, console)
    if cfg.train.compile:
        compile_layers(model, console=console)
    distributed.wrap(model, cfg, device, console)  # DDP or FSDP2 under torchrun; before the optimizer sees the params

    t = cfg.train
    batches = Batches(cfg, data)
    steps_per_epoch = max(1, batches.per_epoch // t.grad_accum)  # whole steps; a remainder rolls into the next epoch
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    eval_plan = batch_plan(cfg, data.eval, data.pad_id) if data.eval else []

    optimizer = build_optimizer(model, cfg, device, console)
    progress = Progress()
    if resume:
        progress, ckpt = resume_from(ckpts, model, optimizer, console)  # the newest intact one
        distributed.check_resume(progress.rows_per_batch, cfg)
        console(f"resuming from {ckpt.name} (step {progress.step} of {total_steps})")
        warn_schedule_change(folder, cfg, console)

    template = resolve_chat_template(tokenizer, cfg.data.chat_template) if cfg.data.chat_template else None
    progress.rows_per_batch = t.batch_size * distributed.world_size()
    if distributed.is_main():  # under torchrun rank 0 alone writes
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text(folder.config, dump_yaml(cfg))
        write_json(folder.data_report, asdict(data.report))
        log = MetricsLog(run_dir, t.tensorboard and "tensorboard" in t.report_to,
                         resume_step=progress.step if resume else 0, report_to=t.report_to,
                         params=to_dict(cfg), console=console)
    else:
        log = distributed.NullLog()
    if log.tb_note:
        console(log.tb_note)
    return Session(cfg=cfg, run_dir=run_dir, folder=folder, device=device, model=model, tokenizer=tokenizer,
                   base_name=base_name, info=RunInfo.of(cfg, chat_template=template),
                   batches=batches, eval_plan=eval_plan, total_steps=total_steps,
                   warmup=warmup_steps(total_steps, t.warmup_steps, t.warmup_ratio), optimizer=optimizer, log=log,
                   progress=progress, trainable=[p for p in model.parameters() if p.requires_grad],
                   meter=SavedTensorMeter(model))


SCHEDULE_KEYS = ("max_steps", "epochs", "lr", "schedule", "warmup_steps", "warmup_ratio")


def warn_schedule_change(folder: RunFolder, cfg: RunConfig, console: Callable[[str], None]) -> None:
    """A resume whose train.* overrides change the learning-rate schedule (e.g. --max-steps 25 on a 200-step
    run) goes on under the new schedule, so the rate jumps at once (2.0e-4 -> 1.4e-4 at step 11 of 200 -> 25,
    measured): say so, reading the run's config.yaml before it is rewritten."""
    try:
        before = (load_yaml(folder.config) or {}).get("train") or {}
    except (OSError, ConfigError):
        return
    now = to_dict(cfg)["train"]
    changed = [f"train.{k} {now[k]} (was {before[k]})" for k in SCHEDULE_KEYS if k in before and before[k] != now[k]]
    if changed:
        console(f"warning: resuming with {', '.join(changed)}: the learning-rate schedule follows the new "
                "values from this step, so the rate changes at once")


def _load(cfg: RunConfig, device: torch.device, console: Callable[[str], None]) -> tuple[Any, Any, str]:
    """(model, tokenizer, the base name an adapter records), the model in the run's dtype on `device`."""
    dtype = pick_dtype(cfg.dtype, device)
    hf_logging.disable_progress_bar()  # our own bar is the only one; errors stay one line
    console(f"loading {cfg.model} ({str(dtype).removeprefix('torch.')} on {device})")
    tokenizer = load_tokenizer(cfg.model, trust_remote_code=cfg.trust_remote_code)
    if cfg.quant.bits:
        console(f"quantizing the base to {cfg.quant.bits} bits while loading"
                + (f" ({cfg.quant.type}, double quant {'on' if cfg.quant.double_quant else 'off'})"
                   if cfg.quant.bits == 4 else ""))
    model = load_model(cfg.model, dtype=dtype, device=device, attn_implementation=cfg.attn_implementation,
                       trust_remote_code=cfg.trust_remote_code, quant=cfg.quant)
    check_vocab(model, tokenizer)
    model.config.use_cache = False
    base_name = cfg.model
    if cfg.model.lower().endswith(".gguf"):  # PEFT and vLLM can't load a .gguf base: record its HF folder
        base_name = resolve_source(cfg.model)
        console(f"{cfg.model} is converted to {base_name}; the adapter records that folder as its base")
    return model, tokenizer, base_name


def check_run_dir(run_dir: Path, resume: bool) -> list[Path]:
    """Refuse an output_dir that cannot be written, a run to overwrite, or a resume with nothing to
    resume from; the run's checkpoints, oldest first. Runs before any loading."""
    check_writable(run_dir)
    folder = RunFolder(run_dir)
    ckpts = folder.checkpoints()
    finished = folder.summary.exists()
    if resume and (finished or not ckpts):
        raise ConfigError(f"{run_dir} already holds a finished run; nothing to resume" if finished else
                          f"--resume: no checkpoint in {run_dir}/checkpoints; start without --resume")
    if not resume and (ckpts or folder.adapter.exists()):
        # A finished run cannot be resumed (see above): only an unfinished one is offered --resume.
        what = ("a finished run; choose another" if finished else
                "a run; pass --resume to continue it, or choose another")
        raise ConfigError(f"{run_dir} already holds {what} output_dir (e.g. --output_dir {run_dir}-2)")
    return ckpts


def check_writable(run_dir: Path) -> None:
    """output_dir is a folder, or can become one: its nearest existing ancestor is a folder this user
    may write into (a read-only filesystem counts as not writable)."""
    here = Path(os.path.abspath(run_dir))
    existing = next(p for p in (here, *here.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == here else f"is inside {existing}, which is a file"
        raise ConfigError(f"output_dir {run_dir} {what}; choose a folder (e.g. --output_dir {here.parent / 'runs'})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {run_dir} cannot be written ({existing} is read-only for this user); "
                          "choose another output_dir or make that folder writable")


def check_positions(cfg: RunConfig, model, data: Prepared) -> None:
    """Refuse examples longer than the model's positions (possible only when data.max_length is beyond
    them): a learned position table has no row past its end (an IndexError mid-run), and rotary
    positions there were never trained. A data.max_length beyond them is harmless while every example
    fits: packed rows restart their positions with each example."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if not isinstance(positions, int) or cfg.data.max_length <= positions:
        return
    longer = sum(len(e) > positions for e in (*data.train, *data.eval))
    if longer:
        raise ConfigError(f"data.max_length {cfg.data.max_length} is beyond the model's {positions} positions "
                          f"(max_position_embeddings) and {longer} examples are longer than that; set "
                          f"--data.max_length {positions} or less (longer examples are then truncated, see data.overlong)")


def check_rank(model) -> None:
    """Refuse a LoRA rank above the width of every adapted layer: B @ A cannot have a rank above
    min(in, out), so what is past it only adds parameters (lora.rank 1000 on a 64-wide model trained
    15x the parameters for nothing, without a word)."""
    widths = {n: min(layer_features(a.base_layer)) for n, a in adapter_modules(model).items()
              if getattr(a, "lora_A", None) is not None and hasattr(a, "base_layer")}
    rank = max((a.rank for a in adapter_modules(model).values() if hasattr(a, "lora_A")), default=0)
    if widths and rank > max(widths.values()):
        name, width = max(widths.items(), key=lambda kv: kv[1])
        raise ConfigError(f"lora.rank {rank} is above the width of every adapted layer (the widest: {name}, "
                          f"min(in, out) = {width}); an update B @ A has rank at most that, so the rest only adds "
                          f"parameters: set --lora.rank {width} or less (typical: 8-64)")


def unpack_if_needed(cfg: RunConfig, console: Callable[[str], None]) -> None:
    """A method that needs one example per row (prompt tuning) turns packing off, with a notice.

    A notice rather than an error: packing is on by default, and for such a method off is the only
    setting that works, so refusing would only make every user type the same override."""
    method = METHODS[cfg.method]
    if cfg.data.packing and not method.packs:
        cfg.data.packing = False
        console(f"note: data.packing is off for method {cfg.method}: its virtual tokens go in front of each "
                "example, so every example gets a row of its own")


def offload_checkpoints(model, copy_on_cpu: bool = False) -> int:
    """Each checkpointed layer's saved input in (pinned) host memory until its recompute (ops/offload.py): the
    layers' checkpoint function, set by transformers, is swapped for the offloading one. Returns the layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module._gradient_checkpointing_func = functools.partial(offloaded_checkpoint, use_reentrant=False,
                                                                  copy_on_cpu=copy_on_cpu)
            n += 1
    return n


def use_kernels(model, cfg: RunConfig, device: torch.device, console: Callable[[str], None]) -> str:
    """`train.kernels`: the Triton kernels into the model and the chunked loss, or torch's ops (ops/triton/)."""
    which = triton_kernels.resolve(cfg.train.kernels, device.type)
    if which == "triton":
        counts = triton_kernels.apply(model)
        console(f"kernels: triton (cross-entropy chunks, {counts['rmsnorm']} RMSNorm, {counts['swiglu']} SwiGLU MLPs)")
    else:
        cross_entropy.use_fused_rows(None)
    return which


def attach_method(model, cfg: RunConfig, tokenizer=None, console: Callable[[str], None] | None = None) -> None:
    """Apply the configured method, found in the registry by name (adapters/base.py `METHODS`): attach it
    from its own config section, seeded so the init is reproducible, with exactly its parameters trainable
    (for full/freeze, the model's own weights), then its extra init if it has one (LoRA's loftq)."""
    method = METHODS[cfg.method]
    section = cfg.sections.get(method.config_section)
    torch.manual_seed(cfg.seed)
    method.prepare(model, section, tokenizer=tokenizer)
    method.init(model, section, weights_dir=lambda: local_model_dir(cfg.model), console=console or print)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so a frozen base works as is.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.checkpoint_offload:
            offload_checkpoints(model)
    elif cfg.train.checkpoint_offload and console is not None:
        console("note: train.checkpoint_offload does nothing without train.gradient_checkpointing")
        if spec_of(model) is not None and hasattr(model, "enable_input_require_grads"):
            # As prepare_model_for_kbit_training: embeddings output a grad-requiring tensor, so every
            # checkpointed segment of a quantized base has a differentiable input (needed by reentrant
            # checkpointing and by any wrapper that checks requires_grad on the inputs).
            model.enable_input_require_grads()
