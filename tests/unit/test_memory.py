"""Memory accounting: the breakdown's numbers agree with what they claim to count."""

from __future__ import annotations

import torch

from leantune.adapters.base import mark_only_adapters_trainable
from leantune.adapters.lora import inject_lora
from leantune.config import from_dict
from leantune.train.memory import SavedTensorMeter, optimizer_state_bytes, parameter_bytes, peak_memory_bytes
from leantune.train.optim import build_optimizer


def lora(model, rank=64):
    inject_lora(model, rank=rank, alpha=rank, targets=["q_proj", "v_proj", "down_proj"])
    mark_only_adapters_trainable(model)
    return model


def one_step(model, optimizer_name):
    cfg = from_dict({"model": "m", "data": {"path": "d"}, "train": {"optimizer": optimizer_name}})
    opt = build_optimizer(model, cfg, "cpu")
    ids = torch.arange(32).view(2, 16) + 6
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    return opt


def trainable_numel(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_adapter_bytes_are_trainable_numel_times_element_size(tiny_llama):
    model = lora(tiny_llama)
    got = parameter_bytes(model)
    assert got["trainable"] == trainable_numel(model) * 4  # fp32
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert got["base_weights"] == (frozen + sum(b.numel() for b in model.buffers())) * 4


def test_adamw_state_is_two_fp32_moments_per_trainable_value(tiny_llama):
    model = lora(tiny_llama)
    opt = one_step(model, "adamw")
    steps = sum(s["step"].numel() * s["step"].element_size() for s in opt.state.values())  # one scalar each
    assert optimizer_state_bytes(opt) - steps == 2 * 4 * trainable_numel(model)


def test_8bit_adamw_state_holds_one_byte_per_moment_and_is_far_smaller(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    sizes, opts = {}, {}
    for name in ("adamw", "adamw_8bit"):
        model = lora(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))
        opts[name] = one_step(model, name)
        sizes[name] = optimizer_state_bytes(opts[name])
    # bitsandbytes quantizes tensors of >= 4096 values (min_8bit_size): two uint8 moments each
    large = sum(p.numel() for p in model.parameters() if p.requires_grad and p.numel() >= 4096)
    codes = sum(t.numel() for s in opts["adamw_8bit"].state.values() for t in s.values()
                if isinstance(t, torch.Tensor) and t.dtype == torch.uint8)
    assert large > 0 and codes == 2 * large
    # the rest is small tensors' fp32 moments, a 256-entry fp32 code book per moment and an absmax per block
    assert sizes["adamw_8bit"] < 0.4 * sizes["adamw"]


def test_saved_activations_grow_with_the_batch_and_exclude_weights(tiny_llama):
    model = lora(tiny_llama).train()
    counted = []
    for rows in (1, 4):
        ids = torch.arange(rows * 16).view(rows, 16) % 300 + 6
        with SavedTensorMeter(model) as meter:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        counted.append(meter.bytes)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert counted[0] > 0
    assert 3.5 < counted[1] / counted[0] < 4.5  # activations scale with tokens; no weight is counted
    assert counted[0] < weights


def test_peak_memory_is_the_kernel_high_water_mark():
    peak, source = peak_memory_bytes("cpu")
    before = peak
    block = torch.ones(64 * 2**20 // 4)  # touch 64 MiB
    block += 1
    after, _ = peak_memory_bytes("cpu")
    assert "RSS" in source and after >= before
    assert after >= 64 * 2**20
