"""Optimizers by name (`train.optimizer`), built over the model's trainable parameters.

    adamw             torch.optim.AdamW (foreach): two fp32 moments per trainable value, 8 bytes each
    adamw_8bit        bitsandbytes AdamW8bit: both moments block-wise quantized to 8 bits (Dettmers et al.
                      2022, https://arxiv.org/abs/2110.02861), ~2 bytes per value; tensors under 4096 values
                      keep 32-bit moments (bitsandbytes' min_8bit_size)
    paged_adamw_8bit  the same with its state in CUDA unified memory, paged out to RAM under memory pressure
    paged_adamw       32-bit bitsandbytes AdamW, paged
    adafactor         torch.optim.Adafactor: factored second moment, no first moment (Shazeer & Stern 2018)
    sgd               torch.optim.SGD with `train.momentum`
    galore_adamw      Adam on low-rank projected gradients of 2-D weights (train/galore.py)

Paging only exists on CUDA. On a CPU run the paged names run their non-paged twins, and the run says so
in one console line (bitsandbytes itself would fall back with a warning that is easy to miss).

Parameter groups are the same for every optimizer: the method's own when it declares some
(`Method.param_groups`: LoRA+ when `lora.lr_ratio` is set), otherwise one group; galore_adamw splits the
2-D Linear weights into a projected group. Every group carries `initial_lr`, which the schedule scales.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..adapters.base import METHODS, trainable_parameters
from .galore import GaLoreAdamW, galore_param_groups

PAGED_FALLBACK = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw": "adamw"}


def param_groups(model: nn.Module, cfg) -> list[dict]:
    t = cfg.train
    method = METHODS[cfg.method]
    groups = method.param_groups(model, t, cfg.sections.get(method.config_section))
    if groups is not None:
        return groups
    params = [p for _, p in trainable_parameters(model)]
    if t.optimizer == "galore_adamw":
        return galore_param_groups(model, params, lr=t.lr, weight_decay=t.weight_decay, rank=cfg.galore.rank,
                                   update_proj_gap=cfg.galore.update_proj_gap, scale=cfg.galore.scale)
    return [{"params": params, "lr": t.lr, "weight_decay": t.weight_decay}]


def resolve_name(name: str, device: torch.device | str, console: Callable[[str], None] = print) -> str:
    """The optimizer that will really run: a paged one becomes its non-paged twin off CUDA, said aloud."""
    if name in PAGED_FALLBACK and torch.device(device).type != "cuda":
        twin = PAGED_FALLBACK[name]
        console(f"train.optimizer {name}: paging needs CUDA and this run is on {torch.device(device).type}; "
                f"running {twin} instead (same update, state stays in RAM)")
        return twin
    return name


def build_optimizer(model: nn.Module, cfg, device: torch.device | str = "cpu",
                    console: Callable[[str], None] = print) -> torch.optim.Optimizer:
    t = cfg.train
    groups = param_groups(model, cfg)
    for g in groups:
        g["initial_lr"] = g["lr"]
    name = resolve_name(t.optimizer, device, console)
    betas = tuple(t.betas)
    if name == "adamw":
        # foreach: one fused kernel per group instead of one per tensor (hundreds of small LoRA tensors).
        return torch.optim.AdamW(groups, lr=t.lr, betas=betas, weight_decay=t.weight_decay, foreach=True)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=t.lr, weight_decay=t.weight_decay)
    if name == "galore_adamw":
        return GaLoreAdamW(groups, lr=t.lr, betas=betas, weight_decay=t.weight_decay)
    import bitsandbytes as bnb  # imported here: 6 s of import time that only these optimizers pay

    # bitsandbytes defaults weight_decay to 1e-2; pass ours so every optimizer decays the same.
    kinds = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
             "paged_adamw": bnb.optim.PagedAdamW}
    return kinds[name](groups, lr=t.lr, betas=betas, weight_decay=t.weight_decay)
