"""Optimizers by name: each trains LoRA on the tiny Llama, keeps LoRA+ groups, and round-trips its state
through a weights_only checkpoint; bitsandbytes' 8-bit AdamW tracks its 32-bit reference; paging off CUDA
is said in one line."""

from __future__ import annotations

import io

import pytest
import torch

from leantune.adapters.base import mark_only_adapters_trainable
from leantune.adapters.lora import inject_lora
from leantune.config import from_dict
from leantune.train.optim import build_optimizer

NAMES = ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw", "adafactor", "sgd"]
# Adafactor scales its step by the parameter's RMS (lora_B starts at 0, so by eps2 = 1e-3) and plain
# SGD has no per-value normalisation: both need larger rates than Adam to move in 8 steps.
LR = {"adafactor": 0.1, "sgd": 1.0}


def cfg_for(optimizer: str, **lora):
    return from_dict({"model": "m", "data": {"path": "d"}, "lora": {"rank": 64, "alpha": 64, **lora},
                      "train": {"optimizer": optimizer, "lr": LR.get(optimizer, 1e-2), "momentum": 0.9 if optimizer == "sgd" else 0.0}})


def lora_model(tiny_llama):
    torch.manual_seed(0)
    # rank 64 on hidden 64: lora_A is 64 x 64 = 4096 values, the smallest tensor bitsandbytes keeps in 8 bits
    inject_lora(tiny_llama, rank=64, alpha=64, targets=["q_proj", "v_proj", "down_proj"])
    mark_only_adapters_trainable(tiny_llama)
    return tiny_llama.train()


def batch_loss(model):
    ids = torch.arange(2, 34).view(2, 16) % 300 + 6
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("name", NAMES)
def test_each_optimizer_lowers_the_loss_of_lora_on_tiny_llama(tiny_llama, name):
    model = lora_model(tiny_llama)
    opt = build_optimizer(model, cfg_for(name), "cpu", console=lambda s: None)
    first = None
    for _ in range(8):
        loss = batch_loss(model)
        first = float(loss.detach()) if first is None else first
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert float(batch_loss(model)) < first - 0.1  # a random model starts at ln(vocab) ~ 6


def test_adamw_8bit_keeps_8_bit_moments_for_large_tensors(tiny_llama):
    model = lora_model(tiny_llama)
    opt = build_optimizer(model, cfg_for("adamw_8bit"), "cpu")
    batch_loss(model).backward()
    opt.step()
    dtypes = {s["state1"].dtype for s in opt.state.values()}
    assert torch.uint8 in dtypes


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_state_survives_a_weights_only_checkpoint(tiny_llama, name):
    model = lora_model(tiny_llama)
    opt = build_optimizer(model, cfg_for(name), "cpu", console=lambda s: None)
    batch_loss(model).backward()
    opt.step()
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    fresh = build_optimizer(model, cfg_for(name), "cpu", console=lambda s: None)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    # the same next step from the restored state as from the original
    before = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    batch_loss(model).backward()
    grads = [p.grad.clone() for g in opt.param_groups for p in g["params"]]
    opt.step()
    after_a = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    with torch.no_grad():
        for p, b, g in zip([p for g in fresh.param_groups for p in g["params"]], before, grads):
            p.copy_(b)
            p.grad = g
    fresh.step()
    after_b = [p.detach() for g in fresh.param_groups for p in g["params"]]
    for a, b in zip(after_a, after_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_loraplus_groups_keep_their_rates_with_every_optimizer(tiny_llama, name):
    model = lora_model(tiny_llama)
    opt = build_optimizer(model, cfg_for(name, lr_ratio=16), "cpu", console=lambda s: None)
    rates = {g["name"]: g["lr"] for g in opt.param_groups}
    assert rates["lora_B"] == pytest.approx(16 * rates["lora_A"])
    assert sum(len(g["params"]) for g in opt.param_groups) == 12  # A and B of 3 adapters in 2 layers


@pytest.mark.parametrize("name,twin", [("paged_adamw_8bit", "AdamW8bit"), ("paged_adamw", "AdamW")])
def test_paged_optimizer_on_cpu_says_what_runs_instead_in_one_line(tiny_llama, name, twin):
    lines = []
    opt = build_optimizer(lora_model(tiny_llama), cfg_for(name), "cpu", console=lines.append)
    assert len(lines) == 1 and "paging needs CUDA" in lines[0] and name in lines[0]
    assert type(opt).__name__ == twin


def test_bnb_adamw_8bit_step_tracks_its_32_bit_reference():
    """bitsandbytes' own promise: 8-bit moments give nearly the updates of 32-bit AdamW."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    w0 = torch.randn(256, 64)
    p8, p32 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    o8 = bnb.optim.AdamW8bit([p8], lr=1e-3, weight_decay=0.0)
    o32 = torch.optim.AdamW([p32], lr=1e-3, weight_decay=0.0)
    for _ in range(10):
        g = torch.randn_like(w0)
        p8.grad, p32.grad = g.clone(), g.clone()
        o8.step()
        o32.step()
    d8, d32 = (p8.detach() - w0).flatten(), (p32.detach() - w0).flatten()
    assert torch.nn.functional.cosine_similarity(d8, d32, dim=0) > 0.99
    assert (d8 - d32).norm() / d32.norm() < 0.1
    assert o8.state[p8]["state1"].dtype == torch.uint8
