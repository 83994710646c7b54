"""Resumable training state: what a checkpoint holds and how it comes back.

A checkpoint is a folder `checkpoints/step-000123/` written atomically (it exists whole or not at all):
- `adapter_config.json` + `adapter_model.safetensors`: the adapter in PEFT's format, usable as is
  (method lora; full and freeze runs write their whole model only at the end);
- `trainable.safetensors`: every trainable tensor by its parameter name (exact resume, any method);
- `optimizer.pt`: optimizer state (tensors and numbers only; loaded with weights_only=True);
- `state.json`: step, data position (epoch, micro-batch index), best eval loss, RNG seeds and states.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..checkpoint.run_folder import RunFolder, checkpoint_dirs
from ..errors import TrainingError
from ..io.atomic import atomic_dir, save_safetensors, write_json
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
    rows_per_batch: int = 0    # rows of a micro-batch over every process (processes x batch_size); 0: not recorded


def save_checkpoint(run_dir: Path, model, optimizer, progress: Progress, *, save_adapter_fn, keep: int,
                    optimizer_state: dict | None = None) -> Path:
    """Write the checkpoint of `progress.step`; `optimizer_state` replaces optimizer.state_dict() (under
    FSDP2 the one gathered to full tensors, train/distributed.py)."""
    final = RunFolder(run_dir).checkpoint(progress.step)
    with atomic_dir(final) as tmp:
        save_adapter_fn(model, tmp)
        trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        save_safetensors(trainable, tmp / "trainable.safetensors")
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {"torch": torch.get_rng_state().tolist()}
        if torch.cuda.is_available():
            rng["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
        write_json(tmp / "state.json", {"progress": asdict(progress), "rng": rng})
    if keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, model, optimizer) -> Progress:
    try:
        saved = load_file(str(ckpt / "trainable.safetensors"))
        state = json.loads((ckpt / "state.json").read_text())
        opt_state = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise TrainingError(f"checkpoint {ckpt} is incomplete ({Path(e.filename).name} missing); "
                            "delete it to resume from the one before") from None
    except Exception as e:  # a damaged file: safetensors, JSON or the optimizer state
        raise TrainingError(f"checkpoint {ckpt} cannot be read ({type(e).__name__}: {str(e)[:120]}); "
                            "delete it to resume from the one before") from None
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
    torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
    if "cuda" in state["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["rng"]["cuda"]])
    return Progress(**state["progress"])
