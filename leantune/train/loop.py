"""The training loop, top to bottom: load, inject, plan, step, evaluate, checkpoint, save.

No Trainer and no callbacks: every step is in `run()` or a plain helper beside it. What it writes into
the run folder, and where, is `checkpoint/run_folder.py`: config.yaml, data_report.json, metrics.jsonl (after
the first step also the memory breakdown, train/memory.py), tensorboard/, loss.svg, checkpoints/step-N/ (each
also a PEFT adapter), the final adapter/ (or model/ after full/freeze), each with its leantune.json sidecar,
and summary.json last.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..adapters.base import ADAPTERS, format_trainable, mark_only_adapters_trainable
from ..checkpoint.adapter_io import save_adapter
from ..checkpoint.run_folder import RunFolder, RunInfo, checkpoint_dirs, write_run_info
from ..config import RunConfig, dump_yaml
from ..data.dataset import batches as plan_batches, build as build_data
from ..data.tokenize import pad_id_for, resolve_chat_template
from ..device import pick_dtype, resolve_device
from ..errors import ConfigError, TrainingError
from ..io.atomic import atomic_dir, write_json, write_text
from ..models.load import check_vocab, load_model, load_tokenizer, resolve_source
from ..models.quantized import local_model_dir
from ..quant import spec_of
from . import step
from .full import mark_trainable, save_model
from .loftq import loftq_init_
from .memory import SavedTensorMeter, breakdown, describe, gradient_bytes, peak_memory_bytes
from .metrics import MetricsLog
from .optim import build_optimizer
from .plot import write_loss_svg
from .schedule import lr_factor, set_lr, warmup_steps
from .state import Progress, load_checkpoint, save_checkpoint


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path | None  # the final adapter, or for method full/freeze the saved model folder
    steps: int
    train_loss: float | None
    eval_loss: float | None
    stopped: str  # "completed" | "early_stopped" | "interrupted"


class _Stop(Exception):
    """Raised by the test hook `stop_after` to simulate a crash after a step."""


def run(cfg: RunConfig, *, resume: bool = False, console: Callable[[str], None] = print,
        stop_after: int | None = None) -> RunResult:
    import torch

    run_dir = Path(cfg.output_dir)
    folder = RunFolder(run_dir)
    ckpts = _check_run_dir(run_dir, resume)

    t = cfg.train
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    dtype = pick_dtype(cfg.dtype, device)

    from transformers.utils import logging as hf_logging

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

    _unpack_if_needed(cfg, console)
    data = build_data(cfg.data, tokenizer, seed=cfg.seed)
    console(data.report.summary())
    pad_id, pad_note = pad_id_for(tokenizer)
    if pad_note:
        console(pad_note)

    _attach_adapter(model, cfg, tokenizer, console)
    model.to(device)
    console(format_trainable(model))
    model.train()

    def epoch_plan(epoch: int) -> list[dict]:
        return plan_batches(data.train, batch_size=t.batch_size, max_length=cfg.data.max_length,
                            packing=cfg.data.packing, pad_id=pad_id, seed=cfg.seed, epoch=epoch)

    plans: dict[int, list[dict]] = {0: epoch_plan(0)}
    micro_per_epoch = len(plans[0])
    steps_per_epoch = max(1, micro_per_epoch // t.grad_accum)  # whole steps; a remainder rolls into the next epoch
    total_steps = t.max_steps or max(1, math.ceil(t.epochs * steps_per_epoch))
    warmup = warmup_steps(total_steps, t.warmup_steps, t.warmup_ratio)
    eval_plan = (plan_batches(data.eval, batch_size=t.batch_size, max_length=cfg.data.max_length,
                              packing=cfg.data.packing, pad_id=pad_id, seed=cfg.seed, epoch=0)
                 if data.eval else [])

    optimizer = build_optimizer(model, cfg, device, console)
    progress = Progress()
    if resume:
        progress = load_checkpoint(ckpts[-1], model, optimizer)
        console(f"resuming from {ckpts[-1].name} (step {progress.step} of {total_steps})")

    template = resolve_chat_template(tokenizer, cfg.data.chat_template) if cfg.data.chat_template else None
    info = RunInfo.of(cfg, chat_template=template)  # the sidecar beside every adapter: how to use it as trained

    def save_adapter_to(m, out: Path) -> None:
        write_run_info(out, info)
        if cfg.method in WHOLE_MODEL:  # a checkpoint's trainable.safetensors already holds every trained weight
            return
        save_adapter(m, out, base_model_name_or_path=base_name, config=cfg)

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text(folder.config, dump_yaml(cfg))
    write_json(folder.data_report, asdict(data.report))
    log = MetricsLog(run_dir, t.tensorboard, resume_step=progress.step if resume else 0)
    if log.tb_note:
        console(log.tb_note)

    def next_micro_batch() -> dict:
        if progress.batch_index >= micro_per_epoch:
            progress.epoch += 1
            progress.batch_index = 0
        if progress.epoch not in plans:
            plans.clear()
            plans[progress.epoch] = epoch_plan(progress.epoch)
        batch = plans[progress.epoch][progress.batch_index]
        progress.batch_index += 1
        return batch

    def checkpoint() -> Path:
        return save_checkpoint(run_dir, model, optimizer, progress, save_adapter_fn=save_adapter_to,
                               keep=t.keep_checkpoints)

    bar = _progress_bar(t.progress, total_steps, progress.step)
    stopped, last_loss, last_eval = "completed", None, None
    trainable = [p for p in model.parameters() if p.requires_grad]
    t_last, tokens_window = time.perf_counter(), 0
    # The state at the last step boundary: Ctrl-C in the middle of a step rewinds to it, so the
    # checkpoint it writes is exactly the one an uninterrupted run would have had after that step.
    boundary = _snapshot(progress)
    in_update = False
    # Measured on this process's first step: saved activations of one micro-batch and the gradients.
    meter, grad_bytes, memory = SavedTensorMeter(model), 0, None
    try:
        while progress.step < total_steps:
            set_lr(optimizer, lr_factor(progress.step, total=total_steps, warmup=warmup, kind=t.schedule))
            micro = [next_micro_batch() for _ in range(t.grad_accum)]
            n_tokens = sum(b["num_label_tokens"] for b in micro)
            step_loss = _accumulate_gradients(model, micro, n_tokens, chunk=t.loss_chunk,
                                              meter=meter if memory is None else None)
            if not math.isfinite(step_loss):
                raise _nan_error(step_loss, progress.step + 1, run_dir, t.lr)
            grad_norm = (torch.nn.utils.clip_grad_norm_(trainable, t.max_grad_norm) if t.max_grad_norm
                         else _grad_norm(trainable))
            if not math.isfinite(float(grad_norm)):
                raise _nan_error(float(grad_norm), progress.step + 1, run_dir, t.lr, what="gradient norm")
            grad_bytes = gradient_bytes(model) if memory is None else grad_bytes
            in_update = True
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.step += 1
            progress.tokens_seen += n_tokens
            in_update = False
            boundary = _snapshot(progress)  # weights and optimizer now hold this step: rewind no further
            tokens_window += sum(b.get("num_tokens", int(b["input_ids"].numel())) for b in micro)  # real tokens
            last_loss = step_loss
            if memory is None:  # optimizer state exists only after the first step
                memory = breakdown(model, optimizer, grad_bytes=grad_bytes, activation_bytes=meter.bytes, device=device)
                log.log(progress.step, **memory)

            if progress.step % max(t.log_every, 1) == 0 or progress.step == total_steps:
                now = time.perf_counter()
                tps = tokens_window / max(now - t_last, 1e-9)
                t_last, tokens_window = now, 0
                log.log(progress.step, loss=step_loss, lr=optimizer.param_groups[0]["lr"],
                        grad_norm=float(grad_norm), tokens_per_s=round(tps, 1), epoch=progress.epoch,
                        label_tokens=n_tokens, peak_memory_mib=round(peak_memory_bytes(device)[0] / 2**20, 1))
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{tps:.0f}")
            bar.update(1)

            is_last = progress.step == total_steps
            if eval_plan and ((t.eval_every and progress.step % t.eval_every == 0) or is_last):
                res = step.evaluate(model, eval_plan, chunk=t.loss_chunk, limit=t.eval_batches)
                if res:
                    last_eval = res["eval_loss"]
                    log.log(progress.step, **res)
                    progress.history.append([progress.step, res["eval_loss"]])
                    bar.write(f"step {progress.step}: eval loss {res['eval_loss']:.4f} (ppl {res['eval_ppl']:.2f})")
                    if progress.best_eval_loss is None or res["eval_loss"] < progress.best_eval_loss - 1e-6:
                        progress.best_eval_loss = res["eval_loss"]
                        progress.evals_without_improvement = 0
                    else:
                        progress.evals_without_improvement += 1
                    if t.early_stopping_patience and progress.evals_without_improvement >= t.early_stopping_patience:
                        stopped = "early_stopped"
                        bar.write(f"early stopping: no better eval loss in {t.early_stopping_patience} evaluations")
                        break
            if t.save_every and progress.step % t.save_every == 0 and not is_last:
                checkpoint()
            if stop_after is not None and progress.step >= stop_after:
                raise _Stop()
            boundary = _snapshot(progress)
    except KeyboardInterrupt:
        bar.close()
        log.close()
        resume_hint = f"continue with `leantune train {folder.config} --resume`"
        if in_update:  # the weights may be half-updated: keep the last checkpoint on disk instead
            console(f"interrupted during an optimizer update; the last checkpoint on disk is kept; {resume_hint}")
            return RunResult(run_dir, None, progress.step, last_loss, last_eval, "interrupted")
        optimizer.zero_grad(set_to_none=True)
        _restore(progress, boundary)
        path = checkpoint() if progress.step > 0 else None
        console(f"interrupted at step {progress.step}" + (f": saved {path}; {resume_hint}" if path else
                                                          " before the first step; nothing to save"))
        return RunResult(run_dir, None, progress.step, last_loss, last_eval, "interrupted")
    except _Stop:
        bar.close()
        log.close()
        return RunResult(run_dir, None, progress.step, last_loss, last_eval, "interrupted")
    except BaseException:
        bar.close()
        log.close()
        raise
    bar.close()

    checkpoint()
    adapter_dir = folder.output(whole_model=cfg.method in WHOLE_MODEL)
    with atomic_dir(adapter_dir) as tmp:
        if cfg.method in WHOLE_MODEL:
            save_model(model, tokenizer, tmp)
        save_adapter_to(model, tmp)
    summary = {"status": stopped, "steps": progress.step, "total_steps": total_steps, "train_loss": last_loss,
               "eval_loss": last_eval, "best_eval_loss": progress.best_eval_loss, "label_tokens": progress.tokens_seen,
               adapter_dir.name: str(adapter_dir), "progress": asdict(progress)}
    if memory is not None:  # the peak again at the end: evaluation and saving can raise it
        memory = breakdown(model, optimizer, grad_bytes=grad_bytes, activation_bytes=meter.bytes, device=device)
        summary["memory"] = memory
        console(describe(memory))
    log.close()
    write_loss_svg(run_dir)
    write_json(folder.summary, summary)
    loss_text = f"train loss {last_loss:.4f}" if last_loss is not None else "nothing left to train"
    console(f"done: {progress.step} steps, {loss_text}"
            + (f", eval loss {last_eval:.4f}" if last_eval is not None else "") + f"; {adapter_dir.name} in {adapter_dir}")
    return RunResult(run_dir, adapter_dir, progress.step, last_loss, last_eval, stopped)


def _accumulate_gradients(model, micro: list[dict], n_tokens: int, *, chunk: int, meter=None) -> float:
    """Forward and backward every micro-batch of a step; each loss is divided by the label tokens of
    the whole step, so k micro-batches of b rows give the gradient of one batch of k*b rows.
    `meter` (a SavedTensorMeter) counts the activations of the first micro-batch."""
    import contextlib

    total = 0.0
    for b in micro:
        if b["num_label_tokens"] == 0:
            continue
        with meter if meter is not None else contextlib.nullcontext():
            loss, _ = step.micro_batch_loss(model, b, normalizer=max(n_tokens, 1), chunk=chunk)
        meter = None
        loss.backward()
        total += float(loss.detach())
    return total


def _nan_error(loss: float, step_no: int, run_dir: Path, lr: float, what: str = "loss") -> TrainingError:
    last_good = checkpoint_dirs(run_dir)
    kept = f"the last good checkpoint is {last_good[-1]}" if last_good else "no checkpoint was written yet"
    return TrainingError(
        f"the {what} became {loss} at step {step_no}; {kept}. Likely causes: a learning rate too high "
        f"(train.lr={lr}; try {lr / 4:g}), no gradient clipping (train.max_grad_norm), fp16 overflow "
        "(use bf16 or fp32), or a corrupt example")


def _check_run_dir(run_dir: Path, resume: bool) -> list[Path]:
    """Refuse to overwrite a run, or to resume one that has nothing to resume from."""
    folder = RunFolder(run_dir)
    ckpts = folder.checkpoints()
    finished = folder.summary.exists()
    if resume and (finished or not ckpts):
        raise ConfigError(f"{run_dir} already holds a finished run; nothing to resume" if finished else
                          f"--resume: no checkpoint in {run_dir}/checkpoints; start without --resume")
    if not resume and (ckpts or folder.adapter.exists()):
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, or choose another "
                          f"output_dir (e.g. --output_dir {run_dir}-2)")
    return ckpts


WHOLE_MODEL = ("full", "freeze")  # methods that train the model's own weights and save the whole model


def _unpack_if_needed(cfg: RunConfig, console: Callable[[str], None]) -> None:
    """A method that needs one example per row (prompt tuning) turns packing off, with a notice.

    A notice rather than an error: packing is on by default, and for such a method off is the only
    setting that works, so refusing would only make every user type the same override."""
    method = ADAPTERS.get(cfg.method)  # None for full/freeze: they pack like any plain model
    if cfg.data.packing and method is not None and not method.packs:
        cfg.data.packing = False
        console(f"note: data.packing is off for method {cfg.method}: its virtual tokens go in front of each "
                "example, so every example gets a row of its own")


def _attach_adapter(model, cfg: RunConfig, tokenizer=None, console: Callable[[str], None] | None = None) -> None:
    """Freeze the base, inject the configured method (seeded, so the init is reproducible), train only it;
    or, for method full/freeze, mark the model's own weights that train (train/full.py).

    An adapter method is found in the registry by name and reads its own config section."""
    import torch

    if cfg.method in WHOLE_MODEL:
        mark_trainable(model, cfg.method, cfg.freeze.train_last_layers, cfg.freeze.train_modules)
    else:
        method = ADAPTERS[cfg.method]
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(cfg.seed)
        method.attach(model, getattr(cfg, method.config_section), tokenizer=tokenizer)
        mark_only_adapters_trainable(model)
        if cfg.method == "lora" and cfg.lora.init == "loftq":
            stats = loftq_init_(model, local_model_dir(cfg.model))
            (console or print)(f"lora.init loftq: {stats['layers']} layers start at the SVD of their quantization error; "
                    f"relative weight error {stats['error_before']:.4f} -> {stats['error_after']:.4f}")
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so a frozen base works as is.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if spec_of(model) is not None and hasattr(model, "enable_input_require_grads"):
            # As prepare_model_for_kbit_training: embeddings output a grad-requiring tensor, so every
            # checkpointed segment of a quantized base has a differentiable input (needed by reentrant
            # checkpointing and by any wrapper that checks requires_grad on the inputs).
            model.enable_input_require_grads()


def _snapshot(progress: Progress) -> tuple:
    import copy

    import torch

    return copy.deepcopy(progress), torch.get_rng_state()


def _restore(progress: Progress, boundary: tuple) -> None:
    import torch

    saved, rng = boundary
    progress.__dict__.update(saved.__dict__)
    torch.set_rng_state(rng)


def _grad_norm(params) -> "float":
    import torch

    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.stack(grads).norm()) if grads else 0.0


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def write(self, s: str) -> None:
        print(s)
    def close(self) -> None: ...


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
