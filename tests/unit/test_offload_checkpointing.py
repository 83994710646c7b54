"""Offloaded gradient checkpointing (`train.checkpoint_offload`): each checkpointed layer's saved input goes
through the offload hooks (ops/offload.py) and the gradients equal plain checkpointing's bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch

from leantune.adapters.base import ADAPTERS, mark_only_adapters_trainable
from leantune.adapters.lora import LoraConfig
from leantune.config import QuantConfig
from leantune.models.load import load_model
from leantune.ops.offload import OffloadSaved
from leantune.train.setup import offload_checkpoints
from leantune.train.step import micro_batch_loss

B, T = 2, 19


def grads(model_dir, bits: int | None, offload: bool, dropout: float) -> tuple[dict, int]:
    quant = QuantConfig(bits=bits, compute_dtype="fp32") if bits else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(model_dir, dtype="fp32", device="cpu", quant=quant)
    model.config.use_cache = False
    torch.manual_seed(0)
    ADAPTERS["lora"].attach(model, LoraConfig(rank=4, alpha=8, dropout=dropout))
    mark_only_adapters_trainable(model)
    for adapter in (m for m in model.modules() if hasattr(m, "lora_B")):
        torch.nn.init.normal_(adapter.lora_B.weight, std=0.02)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if bits:
        model.enable_input_require_grads()
    layers = offload_checkpoints(model, copy_on_cpu=True) if offload else 0
    model.train()
    ids = torch.randint(6, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    torch.manual_seed(1)  # the same dropout masks on both sides (checkpointing replays the RNG state)
    loss, _ = micro_batch_loss(model, batch, normalizer=B * (T - 1), chunk=16)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, layers, model.config


@pytest.mark.parametrize("bits, dropout", [(None, 0.0), (None, 0.1), pytest.param(4, 0.0, id="qlora")])
def test_offloaded_checkpointing_gives_plain_checkpointings_gradients(tiny_llama_dir, bits, dropout):
    if bits:
        pytest.importorskip("bitsandbytes")
    plain, _, _ = grads(tiny_llama_dir, bits, offload=False, dropout=dropout)
    OffloadSaved.reset_counts()
    off, layers, config = grads(tiny_llama_dir, bits, offload=True, dropout=dropout)
    assert layers == config.num_hidden_layers
    assert plain.keys() == off.keys() and plain
    for name in plain:
        assert torch.equal(plain[name], off[name]), name
    counts = OffloadSaved.counts
    # every layer's input went to the host copy (plus checkpoint's 0-size marker) and came back once
    assert counts["bytes"] == layers * B * T * config.hidden_size * 4
    assert counts["packed"] >= layers and counts["unpacked"] == counts["packed"]


def test_offload_hook_round_trips_a_tensor_through_a_host_copy():
    x = torch.randn(3, 5, requires_grad=True)
    OffloadSaved.reset_counts()
    with OffloadSaved(copy_on_cpu=True):
        y = (x * x).sum()
    y.backward()
    assert torch.equal(x.grad, 2 * x.detach())
    assert OffloadSaved.counts["packed"] == 2 and OffloadSaved.counts["bytes"] == 2 * 15 * 4


def test_planner_counts_offloaded_layer_inputs_in_host_ram_not_on_the_device():
    from dataclasses import replace
    from pathlib import Path

    from leantune.plan import Setup, estimate, read_config, shape_of, trainable_of

    cfg = read_config(Path(__file__).parents[1] / "plan_configs" / "Mistral-7B-v0.1.json")
    shape, tr = shape_of(cfg), trainable_of(cfg, "lora")
    gc = Setup(method="lora", quant=4, batch=4, seq=1024, checkpointing=True)
    plain, off = estimate(shape, gc, tr), estimate(shape, replace(gc, offload=True), tr)
    inputs = shape.layers * 2 * shape.hidden * 4 * 1024  # one bf16 (B, T, H) input per layer
    assert plain.activations - off.activations == inputs == off.outside["offload_host"]
    assert off.peak == plain.peak - inputs and "offload_host" not in plain.outside
    on_cpu = replace(gc, offload=True, device="cpu")  # the host is where they already are
    assert estimate(shape, on_cpu, tr, runtime=0).activations == estimate(shape, replace(on_cpu, offload=False), tr,
                                                                           runtime=0).activations
