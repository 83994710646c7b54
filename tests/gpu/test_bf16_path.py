"""The bf16 compute path on CUDA (issue 17): what the CPU dtype audit (tests/unit/test_dtype_audit.py) can only
infer, checked on the kernels themselves. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from leantune.adapters.base import ADAPTERS, mark_only_adapters_trainable  # noqa: E402
from leantune.adapters.lora import LoraConfig  # noqa: E402
from leantune.config import QuantConfig  # noqa: E402
from leantune.models.load import load_model  # noqa: E402
from leantune.ops.cross_entropy import causal_lm_loss  # noqa: E402
from leantune.train.step import micro_batch_loss  # noqa: E402

B, T = 2, 64


def model_with(method: str, bits: int | None, model_dir):
    quant = QuantConfig(bits=bits, compute_dtype="bf16") if bits else None
    model = load_model(model_dir, dtype="bf16", device="cuda", quant=quant)
    model.config.use_cache = False
    torch.manual_seed(0)
    ADAPTERS[method].attach(model, LoraConfig(rank=8, alpha=16))
    mark_only_adapters_trainable(model)
    return model.cuda().train()


def batch(vocab: int) -> dict:
    ids = torch.randint(6, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("method, bits", [("lora", None), ("dora", None), ("lora", 4)], ids=["lora", "dora", "qlora"])
def test_a_bf16_step_runs_with_attention_restricted_to_flash_and_cudnn(tiny_llama_dir, method, bits):
    """Flash and cuDNN attention take bf16/fp16 only: were q, k, v fp32 (the fp32 residual stream over a
    4-bit base), SDPA would find no kernel and raise."""
    if bits:
        pytest.importorskip("bitsandbytes")
    model = model_with(method, bits, tiny_llama_dir)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        loss, _ = micro_batch_loss(model, batch(model.config.vocab_size), normalizer=B * (T - 1), chunk=32)
        loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_labels_left_on_the_host_pick_the_same_positions_as_on_the_device():
    torch.manual_seed(4)
    hidden = torch.randn(2, 9, 8, device="cuda", requires_grad=True)
    w = torch.randn(30, 8, device="cuda")
    labels = torch.randint(0, 30, (2, 9))
    labels[0, :4] = -100
    labels[1, 7] = -100
    on_device, n_device = causal_lm_loss(hidden, w, labels.cuda(), chunk=5)
    g_device, = torch.autograd.grad(on_device, hidden)
    on_host, n_host = causal_lm_loss(hidden, w, labels, chunk=5)  # the index path, sent without blocking
    g_host, = torch.autograd.grad(on_host, hidden)
    assert n_host == n_device
    torch.testing.assert_close(on_host, on_device)
    torch.testing.assert_close(g_host, g_device)
