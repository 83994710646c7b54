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

Master weights. A bf16/fp16 parameter that trains (method full or freeze over a bf16 base) would take
its update in its own dtype, where anything under half a unit in the last place rounds away: a bf16
weight of 0.02 moves in steps of 1.2e-4, so Adam's ~lr-sized steps at lr 1e-5 change nothing, ever. Such
parameters get an fp32 master copy (`MasterWeights`): the optimizer and its state work on the masters,
each step upcasts the gradients, updates the masters, and rounds them once into the model's weights, so
small updates accumulate; the forward and backward keep running in the compute dtype, and the saved model
is in the base's dtype. Cost: 4 bytes per trained value (counted with the optimizer state). Adapters
already keep fp32 masters of their own and are left alone.

Parameter groups are the same for every optimizer: LoRA+ groups when `lora.lr_ratio` is set (method
lora), otherwise one group; galore_adamw splits the 2-D Linear weights into a projected group. Every group
carries `initial_lr`, which the schedule scales.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..adapters.base import trainable_parameters
from ..adapters.lora import loraplus_param_groups
from .galore import GaLoreAdamW, galore_param_groups

PAGED_FALLBACK = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw": "adamw"}


def param_groups(model: nn.Module, cfg) -> list[dict]:
    t = cfg.train
    if cfg.method in ("lora", "dora") and cfg.lora.lr_ratio is not None:
        return loraplus_param_groups(model, lr=t.lr, lr_ratio=cfg.lora.lr_ratio, weight_decay=t.weight_decay)
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
    groups = param_groups(model, cfg)
    for g in groups:
        g["initial_lr"] = g["lr"]
    pairs = [(p, p.detach().float().clone()) for g in groups for p in g["params"]
             if p.dtype in (torch.bfloat16, torch.float16)]
    if not pairs:
        return _build(groups, cfg, device, console)
    master_of = {id(p): m for p, m in pairs}
    for g in groups:
        g["params"] = [master_of.get(id(p), p) for p in g["params"]]
    return MasterWeights(_build(groups, cfg, device, console), pairs)


class MasterWeights:
    """An optimizer over fp32 masters of low-precision parameters (see the module docstring). It answers
    what the loop asks of an optimizer (param_groups, step, zero_grad, state, state_dict) by the inner one."""

    def __init__(self, inner: torch.optim.Optimizer, pairs: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
        self.inner, self.pairs = inner, pairs

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self) -> dict:
        """The inner state plus the masters, so that memory accounting counts them."""
        return {**self.inner.state, "master_weights": [m for _, m in self.pairs]}

    @torch.no_grad()
    def step(self) -> None:
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.to(m.dtype)
        self.inner.step()
        for p, m in self.pairs:
            p.copy_(m)  # one rounding into the compute dtype
            m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)
        for p, _ in self.pairs:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_dict(self) -> dict:
        return {"optimizer": self.inner.state_dict(), "master_weights": [m.detach().clone() for _, m in self.pairs]}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Masters from the checkpoint; from a checkpoint written without them, from the (rounded) weights."""
        masters = state.get("master_weights") if "optimizer" in state else None
        self.inner.load_state_dict(state["optimizer"] if "optimizer" in state else state)
        if masters is not None and len(masters) != len(self.pairs):
            raise ValueError("master weights do not match the parameters")
        for i, (p, m) in enumerate(self.pairs):
            m.copy_(masters[i] if masters is not None else p)


def _build(groups: list[dict], cfg, device: torch.device | str, console: Callable[[str], None]) -> torch.optim.Optimizer:
    t = cfg.train
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
