"""The training loop, top to bottom: step, evaluate, checkpoint, save (train/setup.py loads and plans).

No Trainer and no callbacks: `setup()` builds a Session, `run()` below is the loop, `train_step()` one
optimizer step, `finish()` the final save; the rest are plain helpers. What it writes into the run folder,
and where, is `checkpoint/run_folder.py`: config.yaml, data_report.json, metrics.jsonl (after the first
step also the memory breakdown, train/memory.py), tensorboard/, loss.svg, checkpoints/step-N/ (each also a
PEFT adapter), the final adapter/ (or model/ after full/freeze), each with its leantune.json sidecar, and
summary.json last.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..checkpoint.run_folder import RunFolder
from ..config import RunConfig
from ..errors import TrainingError
from ..io.atomic import write_json
from ..io.faults import Terminated, fault_point, sigterm_as_interrupt
from ..io.lock import held
from . import distributed, faults
from .distributed import global_token_count
from .memory import breakdown, describe, gradient_bytes, peak_memory_bytes
from .metrics import Throughput
from .plot import write_loss_svg
from .schedule import lr_factor, set_lr
from .setup import Session, check_writable, setup
from .state import Progress


@dataclass
class RunResult:
    run_dir: Path
    adapter_dir: Path | None  # the final adapter, or for method full/freeze the saved model folder
    steps: int
    train_loss: float | None
    eval_loss: float | None
    stopped: str  # "completed" | "early_stopped" | "interrupted" (Ctrl-C) | "terminated" (SIGTERM)


@dataclass
class StepResult:
    loss: float  # the step's mean loss per label token
    grad_norm: float  # before clipping
    label_tokens: int  # over every process (distributed.global_token_count)
    tokens: int  # real input tokens this process ran, padding not counted (for tokens/s)


class _Stop(Exception):
    """Raised by the test hook `stop_after` to simulate a crash after a step."""


def run(cfg: RunConfig, *, resume: bool = False, console: Callable[[str], None] = print,
        stop_after: int | None = None, fit: dict | None = None) -> RunResult:
    """Train `cfg` to its last step, an early stop or Ctrl-C; save the adapter (or model) and summary.json.

    `resume` continues from the run's newest checkpoint; `stop_after` (tests) dies after that step.
    One run at a time holds output_dir (a pid lock file, taken over when its process is gone); SIGTERM
    is handled as Ctrl-C (a checkpoint of the last finished step), reported as "terminated".
    `fit` is train.auto_fit's choice (leantune.plan.fit.prepare, applied to `cfg` already): summary.json
    keeps it with the measured peak beside the predicted one."""
    check_writable(Path(cfg.output_dir))  # before the lock creates the folder: one line, not a traceback
    with distributed.started(cfg) as main:  # under torchrun: join the other processes; rank 0 holds the lock
        with (held(RunFolder(cfg.output_dir).lock, f"output_dir {cfg.output_dir}", console) if main
              else contextlib.nullcontext()), sigterm_as_interrupt():
            if main:
                faults.clean_stale(Path(cfg.output_dir), console)  # a dead run's half-written temporaries
            return _run(cfg, resume, console, stop_after, fit)


def _run(cfg: RunConfig, resume: bool, console: Callable[[str], None], stop_after: int | None,
         fit: dict | None = None) -> RunResult:
    if cfg.train.auto_fit and fit is None and not resume:
        console("note: train.auto_fit is applied by `leantune train` (from Python: leantune.plan.fit.prepare(cfg) "
                "before run); this run keeps its configured batch")
    s = setup(cfg, resume=resume, console=console)
    s.fit = fit
    t, progress = cfg.train, s.progress
    s.last_loss, s.last_eval = progress.last_loss, progress.last_eval  # a resume reports them too
    bar = _progress_bar(t.progress, s.total_steps, progress.step)
    speed, stopped = Throughput(), "completed"
    # The state at the last step boundary: Ctrl-C in the middle of a step rewinds to it, so the
    # checkpoint it writes is exactly the one an uninterrupted run would have had after that step.
    boundary = _snapshot(progress)
    try:
        while progress.step < s.total_steps:
            try:
                r = train_step(s, [s.batches.next(progress) for _ in range(t.grad_accum)])
            except faults.NonFinite as e:  # train.on_nonfinite: stop raises; skip_batch/rollback go on
                faults.recover(s, e, console)
                boundary = _snapshot(progress)
                continue
            boundary = _snapshot(progress)  # weights and optimizer now hold this step: rewind no further
            speed.add(r.tokens)
            if progress.step % max(t.log_every, 1) == 0 or progress.step == s.total_steps:
                tps = speed.read()
                s.log.log(progress.step, loss=r.loss, lr=s.optimizer.param_groups[0]["lr"], grad_norm=r.grad_norm,
                          tokens_per_s=round(tps, 1), epoch=progress.epoch, label_tokens=r.label_tokens,
                          peak_memory_mib=round(peak_memory_bytes(s.device)[0] / 2**20, 1))
                bar.set_postfix(loss=f"{r.loss:.4f}", tok_s=f"{tps:.0f}")
            bar.update(1)
            is_last = progress.step == s.total_steps
            eval_due = bool(s.eval_plan) and ((t.eval_every and progress.step % t.eval_every == 0) or is_last)
            if eval_due and (fault_point("eval") or evaluate_and_track(s, bar)):
                stopped = "early_stopped"
                bar.write(f"early stopping: no better eval loss in {t.early_stopping_patience} evaluations")
                break
            if t.save_every and progress.step % t.save_every == 0 and not is_last:
                s.checkpoint()
            if stop_after is not None and progress.step >= stop_after:
                raise _Stop()
            boundary = _snapshot(progress)
    except KeyboardInterrupt as e:
        _close(bar, s)
        return _interrupted(s, boundary, console, isinstance(e, Terminated))
    except _Stop:
        _close(bar, s)
        return _result(s, None, "interrupted")
    except BaseException:
        _close(bar, s)
        raise
    bar.close()
    try:
        return finish(s, stopped, console)
    except KeyboardInterrupt as e:  # during the final save: what is on disk resumes; say how
        s.log.close()
        console(f"interrupted during the final save at step {progress.step}; the newest complete checkpoint on disk "
                f"is kept; continue with `leantune train {s.folder.config} --resume`")
        return _result(s, None, "terminated" if isinstance(e, Terminated) else "interrupted")


def train_step(s: Session, micro: list[dict]) -> StepResult:
    """One optimizer step over `micro` (train.grad_accum micro-batches): set the learning rate, forward
    and backward each, stop on a non-finite loss or gradient norm, clip, update. On the first step it
    also measures the memory breakdown (optimizer state exists only after it) and logs it."""
    t, progress = s.cfg.train, s.progress
    set_lr(s.optimizer, lr_factor(progress.step, total=s.total_steps, warmup=s.warmup, kind=t.schedule))
    first = s.memory is None
    n_tokens = global_token_count(sum(b["num_label_tokens"] for b in micro))
    loss = _accumulate_gradients(s.model, micro, n_tokens, chunk=t.loss_chunk, meter=s.meter if first else None)
    loss = distributed.average(loss)  # each rank's loss is W x its share of the step's (distributed.py)
    if not math.isfinite(loss):
        raise faults.NonFinite(loss, "loss", progress.step + 1)
    grad_norm = distributed.clip_grad_norm(s.trainable, t.max_grad_norm)  # over every process's gradients
    if not math.isfinite(grad_norm):
        raise faults.NonFinite(grad_norm, "gradient norm", progress.step + 1)
    if first:
        s.grad_bytes = gradient_bytes(s.model)
    s.in_update = True
    fault_point("optimizer")
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    progress.step += 1
    progress.tokens_seen += n_tokens
    s.in_update = False
    s.last_loss = progress.last_loss = loss
    if first:
        s.memory = _memory(s)
        s.log.log(progress.step, **s.memory)
    real = sum(b.get("num_tokens", int(b["input_ids"].numel())) for b in micro)  # padding not counted
    return StepResult(loss, grad_norm, n_tokens, real)


def evaluate_and_track(s: Session, bar) -> bool:
    """Held-out loss now, logged and tracked for early stopping; True when patience has run out."""
    t, progress = s.cfg.train, s.progress
    res = distributed.evaluate(s.model, s.eval_plan, chunk=t.loss_chunk, limit=t.eval_batches)
    if not res:
        return False
    s.last_eval = progress.last_eval = res["eval_loss"]
    s.log.log(progress.step, **res)
    progress.history.append([progress.step, res["eval_loss"]])
    bar.write(f"step {progress.step}: eval loss {res['eval_loss']:.4f} (ppl {res['eval_ppl']:.2f})")
    if progress.best_eval_loss is None or res["eval_loss"] < progress.best_eval_loss - 1e-6:
        progress.best_eval_loss = res["eval_loss"]
        progress.evals_without_improvement = 0
    else:
        progress.evals_without_improvement += 1
    return bool(t.early_stopping_patience) and progress.evals_without_improvement >= t.early_stopping_patience


def finish(s: Session, stopped: str, console: Callable[[str], None]) -> RunResult:
    """The last checkpoint, the final adapter (or model), loss.svg, and summary.json last of all."""
    progress = s.progress
    s.checkpoint()
    out = s.folder.output(whole_model=s.whole_model)
    s.save_final(out)  # gathered on every process, written by rank 0, re-read and checked (verify_saved)
    summary = {"status": stopped, "steps": progress.step, "total_steps": s.total_steps, "train_loss": s.last_loss,
               "eval_loss": s.last_eval, "best_eval_loss": progress.best_eval_loss,
               "label_tokens": progress.tokens_seen, out.name: str(out), "progress": asdict(progress)}
    if s.memory is not None:  # the peak again at the end: evaluation and saving can raise it
        summary["memory"] = s.memory = _memory(s)
        console(describe(s.memory))
    if s.fit is not None:  # auto_fit: the planner's prediction beside what this run measured
        summary["fit"] = dict(s.fit, measured_peak_bytes=(s.memory or {}).get("mem_peak_bytes"))
        if s.memory is not None:
            console(f"auto_fit: predicted peak {s.fit['predicted_peak_bytes'] / 2**20:.0f} MiB, measured "
                    f"{s.memory['mem_peak_bytes'] / 2**20:.0f} MiB ({s.memory['mem_peak_source']})")
    s.log.close()
    if not distributed.agree():  # every process got here: only then is the run done
        raise TrainingError("another process of this run failed; see its error above")
    if distributed.is_main():
        write_loss_svg(s.run_dir)
        write_json(s.folder.summary, summary)
    loss_text = f"train loss {s.last_loss:.4f}" if s.last_loss is not None else "nothing left to train"
    console(f"done: {progress.step} steps, {loss_text}"
            + (f", eval loss {s.last_eval:.4f}" if s.last_eval is not None else "") + f"; {out.name} in {out}")
    return _result(s, out, stopped)


def _interrupted(s: Session, boundary: tuple, console: Callable[[str], None], terminated: bool = False) -> RunResult:
    """Ctrl-C or SIGTERM: save the state at the last step boundary as a checkpoint, unless the weights may
    be half-updated (then the last checkpoint on disk stays the one to resume from)."""
    resume_hint = f"continue with `leantune train {s.folder.config} --resume`"
    how, stopped = ("terminated (SIGTERM)", "terminated") if terminated else ("interrupted", "interrupted")
    if s.in_update:
        console(f"{how} during an optimizer update; the last checkpoint on disk is kept; {resume_hint}")
        return _result(s, None, stopped)
    s.optimizer.zero_grad(set_to_none=True)
    _restore(s.progress, boundary)
    path = s.checkpoint() if s.progress.step > 0 else None
    console(f"{how} at step {s.progress.step}" + (f": saved {path}; {resume_hint}" if path else
                                                   " before the first step; nothing to save"))
    return _result(s, None, stopped)


def _result(s: Session, out: Path | None, stopped: str) -> RunResult:
    return RunResult(s.run_dir, out, s.progress.step, s.last_loss, s.last_eval, stopped)


def _close(bar, s: Session) -> None:
    bar.close()
    s.log.close()


def _memory(s: Session) -> dict:
    return breakdown(s.model, s.optimizer, grad_bytes=s.grad_bytes, activation_bytes=s.meter.bytes, device=s.device)


def _accumulate_gradients(model, micro: list[dict], n_tokens: int, *, chunk: int, meter=None) -> float:
    """Forward and backward every micro-batch of a step; each loss is divided by the label tokens of
    the whole step, so k micro-batches of b rows give the gradient of one batch of k*b rows.
    `meter` (a SavedTensorMeter) counts the activations of the first micro-batch."""
    total = 0.0
    for b in micro:
        if distributed.skippable(b):  # no labels: skipped in one process, run in several (collectives)
            continue
        fault_point("forward")
        with meter if meter is not None else contextlib.nullcontext():
            loss, _ = distributed.micro_batch_loss(model, b, normalizer=max(n_tokens, 1), chunk=chunk)
        meter = None
        fault_point("backward")
        loss.backward()
        total += float(loss.detach())
    return total


def _snapshot(progress: Progress) -> tuple:
    return copy.deepcopy(progress), torch.get_rng_state()


def _restore(progress: Progress, boundary: tuple) -> None:
    saved, rng = boundary
    progress.__dict__.update(saved.__dict__)
    torch.set_rng_state(rng)


class _NoBar:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw) -> None: ...
    def write(self, s: str) -> None:
        print(s)
    def close(self) -> None: ...


def _progress_bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return _NoBar()
    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
