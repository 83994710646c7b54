"""Resumable training state: what a checkpoint holds and how it comes back.

A checkpoint is a folder `checkpoints/step-000123/` written atomically (it exists whole or not at all):
- `adapter_config.json` + `adapter_model.safetensors`: the adapter in PEFT's format, usable as is
  (method lora; full and freeze runs write their whole model only at the end);
- `trainable.safetensors`: every trainable tensor by its parameter name (exact resume, any method);
- `optimizer.pt`: optimizer state (tensors and numbers only; loaded with weights_only=True);
- `state.json`: step, data position (epoch, micro-batch index), best eval loss, RNG seeds and states;
- `manifest.json`, written last: the size and sha256 of every file above (io/manifest.py).

Before writing, the disk must have room for it (train/faults.py `check_space`); before the folder takes its
name, every tensor file is read back (`verify_saved`). On resume the newest checkpoint whose files match
their manifest is the one loaded: a damaged one is renamed `step-N.damaged`, with a warning, and the one
before it is tried.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..checkpoint.run_folder import RunFolder, checkpoint_dirs
from ..errors import TrainingError
from ..io.atomic import DiskFullError, atomic_dir, free_bytes, save_safetensors, write_json
from ..io.faults import fault_point
from ..io.manifest import verify_manifest, write_manifest
from .distributed import copy_full, shard_optimizer_state


@dataclass
class Progress:
    step: int = 0              # optimizer steps done
    epoch: int = 0             # data epoch of the next micro-batch
    batch_index: int = 0       # index of the next micro-batch in that epoch's plan
    tokens_seen: int = 0       # label tokens trained on
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    history: list = field(default_factory=list)  # eval results [(step, loss)]
    last_loss: float | None = None  # the last step's train loss and the last eval loss: what summary.json
    last_eval: float | None = None  # reports, also after a resume that has no step left to run
    nonfinite: int = 0         # steps skipped or rolled back for a non-finite loss (train.on_nonfinite)
    rows_per_batch: int = 0    # rows of a micro-batch over every process (processes x batch_size); 0: not recorded


def save_checkpoint(run_dir: Path, model, optimizer, progress: Progress, *, save_adapter_fn, keep: int,
                    optimizer_state: dict | None = None) -> Path:
    """Write the checkpoint of `progress.step`; `optimizer_state` replaces optimizer.state_dict() (under
    FSDP2 the one gathered to full tensors, train/distributed.py)."""
    final = RunFolder(run_dir).checkpoint(progress.step)
    check_space(Path(run_dir), model)
    try:
        _write_checkpoint(final, model, optimizer, progress, save_adapter_fn, optimizer_state)
    except DiskFullError as e:
        ckpts = checkpoint_dirs(run_dir)
        kept = f"the last good checkpoint, {ckpts[-1].name}, is intact" if ckpts else "no checkpoint was written yet"
        raise DiskFullError(f"{e}; {kept} (resume with --resume once there is room)") from None
    if keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(final: Path, model, optimizer, progress: Progress, save_adapter_fn,
                      optimizer_state: dict | None = None) -> None:
    with atomic_dir(final) as tmp:
        save_adapter_fn(model, tmp)
        trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        save_safetensors(trainable, tmp / "trainable.safetensors")
        fault_point("checkpoint")
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state().tolist()}
        if torch.cuda.is_available():
            rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        write_json(tmp / "state.json", {"progress": asdict(progress), "rng": rng})
        verify_saved(tmp, model)
        write_manifest(tmp)


class Damaged(TrainingError):
    """A checkpoint's files are missing, garbled or differ from its manifest."""


def resume_from(ckpts: list[Path], model, optimizer, console) -> tuple[Progress, Path]:
    """Load the newest intact checkpoint of `ckpts` (oldest first); a damaged one is renamed aside, with a
    warning, and the one before it tried. A checkpoint that does not fit the run is an error, not damage."""
    for ckpt in reversed(ckpts):
        problem = verify_manifest(ckpt)
        if problem is None:
            try:
                return load_checkpoint(ckpt, model, optimizer), ckpt
            except Damaged as e:
                problem = str(e)
        aside = ckpt.with_name(ckpt.name + ".damaged")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(ckpt, aside)
        console(f"warning: checkpoint {ckpt.name} is damaged ({problem}); moved it to {aside.name} and "
                "resume from the one before")
    raise TrainingError(f"no intact checkpoint left in {Path(ckpts[-1]).parent} (the damaged ones are kept as "
                        "step-N.damaged); start again in a new output_dir, without --resume")


def load_checkpoint(ckpt: Path, model, optimizer) -> Progress:
    try:
        saved = load_file(str(ckpt / "trainable.safetensors"))
        state = json.loads((ckpt / "state.json").read_text())
        progress = Progress(**state["progress"])
        rng = torch.tensor(state["rng"]["torch"], dtype=torch.uint8)
        opt_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise Damaged(f"checkpoint {ckpt} is incomplete ({Path(e.filename).name} missing)") from None
    except Exception as e:  # a damaged file: safetensors, JSON or the optimizer state
        raise Damaged(f"checkpoint {ckpt} cannot be read ({type(e).__name__}: {str(e)[:120]})") from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(saved) != set(params):
        missing = sorted(set(params) - set(saved))[:3]
        raise TrainingError(f"checkpoint {ckpt} does not match this run's trainable parameters "
                            f"(e.g. {missing or sorted(set(saved) - set(params))[:3]}); was the config changed? "
                            "Resume with the run's saved config.yaml, or start a new output_dir")
    with torch.no_grad():
        for n, p in params.items():
            if saved[n].shape != p.shape:
                raise TrainingError(f"checkpoint tensor {n} has shape {tuple(saved[n].shape)}, the run has "
                                    f"{tuple(p.shape)}; resume with the run's saved config.yaml")
            copy_full(p, saved[n])  # p.copy_, also when p is this process's FSDP2 shard
    try:
        optimizer.load_state_dict(shard_optimizer_state(optimizer, opt_state))
    except ValueError:
        raise TrainingError(f"checkpoint {ckpt}'s optimizer state does not match this run's parameter groups "
                            "(was lora.lr_ratio changed?); resume with the run's saved config.yaml") from None
    torch.set_rng_state(rng)
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["rng"]["cuda"]])
    return progress


def checkpoint_size(run_dir: Path, model) -> int:
    """Bytes the next checkpoint needs: the last one's size, or before the first an estimate (the trainable
    tensors three times: adapter, trainable copy and optimizer state of two moments ~ 4x, 2x for bf16)."""
    ckpts = checkpoint_dirs(run_dir)
    if ckpts:
        return sum(p.stat().st_size for p in ckpts[-1].iterdir() if p.is_file())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return 4 * trainable + (1 << 20)


def check_space(run_dir: Path, model) -> None:
    """Refuse to start a checkpoint the disk cannot hold (with 10% to spare): stopping now keeps the
    previous checkpoint, where running out mid-write would only fail later with less said."""
    need = int(checkpoint_size(run_dir, model) * 1.1)
    free = free_bytes(run_dir)
    if free < need:
        ckpts = checkpoint_dirs(run_dir)
        kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
        raise DiskFullError(f"the disk holding {run_dir} has {free / 2**20:.1f} MiB free and the next checkpoint "
                            f"needs about {need / 2**20:.1f} MiB; {kept}. Free space there (or lower "
                            "train.keep_checkpoints) and resume with --resume")


def verify_saved(folder: Path, model=None) -> None:
    """Read back what was just written into `folder`: every .safetensors file parses, holds at least one
    tensor and nothing non-finite; `trainable.safetensors` equals the model's trainable tensors. Raises
    TrainingError instead of reporting success on an empty or truncated adapter."""
    def bad(why: str) -> TrainingError:
        return TrainingError(f"the adapter saved in {folder} does not read back ({why}); nothing was kept "
                             "under that name. Check the disk, then resume with --resume")

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise bad("no .safetensors file")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad} if model is not None else {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                keys = list(st.keys())
                if not keys:
                    raise bad(f"{f.name} holds no tensor")
                for k in keys:
                    t = st.get_tensor(k)
                    if t.is_floating_point() and not torch.isfinite(t).all():
                        raise bad(f"{f.name}: {k} is not finite")
                    if f.name == "trainable.safetensors" and k in params and not torch.equal(
                            t, params[k].detach().cpu().to(t.dtype)):
                        raise bad(f"{f.name}: {k} differs from the model's")
        except TrainingError:
            raise
        except Exception as e:  # a truncated or garbled file: safetensors' own error
            raise bad(f"{f.name}: {type(e).__name__}: {str(e)[:100]}") from None
