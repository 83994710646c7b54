"""The dtype audit: what a bf16 training step really asks of the hardware, recorded op by op on the CPU.

CI has no GPU, so the CUDA path is kept honest here: a bf16 step of a tiny Llama (LoRA, DoRA, and QLoRA
over a 4-bit base) runs under a TorchDispatchMode that records every matmul and attention op with its
operands' dtypes and shapes. On a GPU an fp32 GEMM over activations runs on the slow fp32 path (the
issue's profile: `sm80_xmma_gemm_f32f32`), and fp32 q/k/v keep attention out of SDPA's flash and cuDNN
kernels (they take bf16/fp16 only). So a bf16 step must:

  - run every GEMM that touches activations in bf16 (an fp32 product of weights alone, such as DoRA's
    B @ A or a norm statistic, is allowed: its size does not grow with the batch);
  - send attention through scaled_dot_product_attention with bf16 q, k, v (no eager softmax/bmm).

Activations are told apart by their sizes: the sequence length (23) and the token counts it makes
(B*T = 46, B*(T-1) = 44 labelled positions) are sizes no weight of the tiny model has.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from leantune.adapters.base import ADAPTERS, mark_only_adapters_trainable
from leantune.config import LoraConfig, QuantConfig
from leantune.models.load import load_model
from leantune.train.step import micro_batch_loss

B, T = 2, 23
ACTIVATION_SIZES = {T, T - 1, B * T, B * (T - 1)}
aten = torch.ops.aten
GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.addmm_.default,
         aten.mm.out, aten.addmm.out}


class OpLog(TorchDispatchMode):
    """Every op's name with its tensor arguments' (dtype, shape)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple[object, list[tuple[torch.dtype, tuple[int, ...]]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs or {})) if isinstance(a, torch.Tensor)]
        self.ops.append((func, [(t.dtype, tuple(t.shape)) for t in tensors]))
        return func(*args, **(kwargs or {}))


def bf16_step(model_dir, method: str, bits: int | None) -> OpLog:
    quant = QuantConfig(bits=bits, compute_dtype="bf16") if bits else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "bf16 is slow on this CPU" is expected here
        model = load_model(model_dir, dtype="bf16", device="cpu", quant=quant)
    model.config.use_cache = False
    torch.manual_seed(0)
    ADAPTERS[method].attach(model, LoraConfig(rank=8, alpha=16, dropout=0.0))
    mark_only_adapters_trainable(model)
    for adapter in (m for m in model.modules() if hasattr(m, "lora_B")):
        torch.nn.init.normal_(adapter.lora_B.weight, std=0.02)  # B = 0 would leave A without a gradient
    model.train()
    ids = torch.randint(6, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    log = OpLog()
    with log:
        loss, _ = micro_batch_loss(model, batch, normalizer=B * (T - 1), chunk=16)
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)  # fp32 masters, fp32 grads
    return log


CASES = [("lora", None), ("dora", None), pytest.param("lora", 4, id="qlora"), pytest.param("dora", 4, id="qdora")]


@pytest.mark.parametrize("method, bits", CASES)
def test_bf16_step_runs_no_fp32_gemm_over_activations(tiny_llama_dir, method, bits):
    if bits:
        pytest.importorskip("bitsandbytes")
    log = bf16_step(tiny_llama_dir, method, bits)
    gemms = [(f, ts) for f, ts in log.ops if f in GEMMS]
    over_activations = [(f, ts) for f, ts in gemms if any(set(s) & ACTIVATION_SIZES for _, s in ts)]
    assert len(over_activations) > 20  # the audit saw the step's products (else it proves nothing)
    wide = [(str(f), ts) for f, ts in over_activations if any(d != torch.bfloat16 for d, _ in ts)]
    assert not wide, f"{len(wide)} GEMMs over activations are not bf16, e.g. {wide[:3]}"


@pytest.mark.parametrize("method, bits", CASES)
def test_bf16_step_sends_attention_through_sdpa_in_bf16(tiny_llama_dir, method, bits):
    if bits:
        pytest.importorskip("bitsandbytes")
    log = bf16_step(tiny_llama_dir, method, bits)
    names = [f.name() for f, _ in log.ops]
    sdpa = [(f, ts) for f, ts in log.ops if "scaled_dot_product" in f.name() and "backward" not in f.name()]
    assert len(sdpa) == 2, names  # one per layer
    for _, ts in sdpa:
        q, k, v = ts[:3]
        assert q[0] == k[0] == v[0] == torch.bfloat16, ts  # flash/cuDNN take bf16, never fp32
    assert any("scaled_dot_product" in n and "backward" in n for n in names)
    assert not any(n.startswith(("aten::_softmax", "aten::bmm")) for n in names)  # no eager attention
