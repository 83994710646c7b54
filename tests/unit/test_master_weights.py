"""Full and freeze fine-tuning over a bf16 base keep fp32 master weights: an update far below a bf16 weight's
resolution accumulates instead of rounding away, and the model keeps (and saves) its bf16 weights."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from leantune.config import from_dict
from leantune.train.optim import MasterWeights, build_optimizer


def cfg(optimizer="adamw", lr=1e-5):
    return from_dict({"model": "m", "data": {"path": "d"}, "method": "full",
                      "train": {"optimizer": optimizer, "lr": lr, "weight_decay": 0.0}})


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_bf16_weights_follow_the_fp32_trajectory_rounded_once(optimizer):
    torch.manual_seed(0)
    low = nn.Linear(64, 32).to(torch.bfloat16)
    start = low.weight.detach().clone()
    ref = nn.Linear(64, 32)  # the fp32 run that the bf16 one must equal, rounded once
    with torch.no_grad():
        ref.weight.copy_(low.weight)
        ref.bias.copy_(low.bias)
    lr = 1e-5  # Adam steps ~lr; SGD steps lr * grad, also ~lr here
    opt_ref, opt_low = build_optimizer(ref, cfg(optimizer, lr)), build_optimizer(low, cfg(optimizer, lr))
    assert isinstance(opt_low, MasterWeights) and not isinstance(opt_ref, MasterWeights)
    for step in range(16):
        g = torch.Generator().manual_seed(step)
        for r, p in ((ref.weight, low.weight), (ref.bias, low.bias)):
            grad = (torch.randn(p.shape, generator=g) * 0.1 + 1.0).bfloat16()  # the same bf16 gradients
            p.grad, r.grad = grad, grad.float()
        opt_ref.step()
        opt_low.step()
        opt_ref.zero_grad()
        opt_low.zero_grad()
    assert low.weight.dtype == torch.bfloat16 and low.weight.grad is None
    assert torch.equal(low.weight, ref.weight.detach().to(torch.bfloat16))
    # 16 steps of ~1e-5 make ~1.6e-4, about one bf16 step at these weights' size: most of them moved.
    # Updated in bf16 itself, each 1e-5 step rounds away and (almost) none would.
    assert (low.weight != start).float().mean() > 0.5


def test_masters_and_moments_survive_a_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(16, 8).to(torch.bfloat16)
    opt = build_optimizer(model, cfg())
    for _ in range(3):
        model.weight.grad = torch.ones_like(model.weight)
        model.bias.grad = torch.ones_like(model.bias)
        opt.step()
        opt.zero_grad()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    fresh_model = nn.Linear(16, 8).to(torch.bfloat16)
    with torch.no_grad():
        fresh_model.weight.copy_(model.weight)
        fresh_model.bias.copy_(model.bias)
    fresh = build_optimizer(fresh_model, cfg())
    fresh.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for (_, m), (_, n) in zip(opt.pairs, fresh.pairs):
        assert torch.equal(m, n) and m.dtype == torch.float32  # the sub-bf16 part is kept, not re-rounded
    assert fresh.state_dict()["optimizer"]["state"].keys() == opt.state_dict()["optimizer"]["state"].keys()


def test_full_run_in_bf16_takes_small_updates_and_saves_bf16(tiny_llama_dir, tmp_path):
    """The CLI with --dtype bf16 (forced on this CPU) and lr 1e-5: the saved model is bf16 and most of
    its weights moved; without masters, 1e-5 steps on weights of ~0.02 (bf16 step 1.2e-4) round away."""
    from safetensors import safe_open

    from e2e.test_train_cli import base_args, write_chat_data
    from leantune.cli.main import main

    data = write_chat_data(tmp_path / "d.jsonl", n=24)
    out = tmp_path / "run"
    assert main(base_args(tiny_llama_dir, data, out, "--dtype", "bf16", "--method", "full", "--train.max_steps",
                          "12", "--train.lr", "1e-5", "--train.warmup_steps", "0", "--train.eval_every", "0",
                          "--train.max_grad_norm", "null")) == 0
    assert json.loads((out / "model" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(out / "model" / "model.safetensors"), "pt") as f, \
            safe_open(str(tiny_llama_dir / "model.safetensors"), "pt") as g:
        w = f.get_tensor("model.layers.0.mlp.down_proj.weight")
        w0 = g.get_tensor("model.layers.0.mlp.down_proj.weight").to(torch.bfloat16)
    assert w.dtype == torch.bfloat16
    assert (w != w0).float().mean() > 0.3, float((w != w0).float().mean())  # measured: 0.74; 0.15 without masters
