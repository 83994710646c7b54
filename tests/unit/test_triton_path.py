"""`train.kernels: triton` on a whole bf16 LoRA step of a tiny Llama, the kernels run by Triton's CPU interpreter:
the patched model gives the torch path's loss and gradients, keeps bf16 activations (the dtype audit's rule: no
fp32 GEMM over activations), and `resolve` refuses triton on a CPU without the interpreter in one line."""

import pytest
import torch

from leantune.errors import ConfigError
from leantune.ops import cross_entropy
from leantune.ops.triton import resolve

from .triton_interpreted import kernels

kernels()  # skips where triton is not installed; patch.apply then finds the kernels imported, interpreted

B, T = 2, 11
GEMMS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


def step(model_dir, triton: bool):
    import warnings

    from torch.utils._python_dispatch import TorchDispatchMode

    from leantune.adapters.base import ADAPTERS, mark_only_adapters_trainable
    from leantune.adapters.lora import LoraConfig
    from leantune.models.load import load_model
    from leantune.train.step import micro_batch_loss

    class Gemms(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.fp32_over_activations = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in GEMMS:
                ts = [a for a in args if isinstance(a, torch.Tensor)]
                if any(t.dtype == torch.float32 for t in ts) and any(B * (T - 1) in t.shape or B * T in t.shape
                                                                      for t in ts):
                    self.fp32_over_activations.append((func, [(t.dtype, tuple(t.shape)) for t in ts]))
            return func(*args, **(kwargs or {}))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(model_dir, dtype="bf16", device="cpu")
    model.config.use_cache = False
    torch.manual_seed(0)
    ADAPTERS["lora"].attach(model, LoraConfig(rank=4, alpha=8, dropout=0.0))
    mark_only_adapters_trainable(model)
    for adapter in (m for m in model.modules() if hasattr(m, "lora_B")):
        torch.nn.init.normal_(adapter.lora_B.weight, std=0.02)
    counts = None
    if triton:
        from leantune.ops.triton.patch import apply
        counts = apply(model)
    model.train()
    ids = torch.randint(6, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    log = Gemms()
    try:
        with log:
            loss, _ = micro_batch_loss(model, batch, normalizer=B * (T - 1), chunk=8)
            loss.backward()
    finally:
        cross_entropy.use_fused_rows(None)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, counts, log.fp32_over_activations, model.config


def test_triton_kernels_step_matches_torch_and_stays_bf16(tiny_llama_dir):
    loss_t, grads_t, _, _, _ = step(tiny_llama_dir, triton=False)
    loss_k, grads_k, counts, fp32_gemms, config = step(tiny_llama_dir, triton=True)
    assert counts == {"rmsnorm": 2 * config.num_hidden_layers + 1, "swiglu": config.num_hidden_layers}
    assert fp32_gemms == []
    torch.testing.assert_close(loss_k, loss_t, atol=2e-2, rtol=1e-2)
    assert grads_k.keys() == grads_t.keys()
    for name in grads_t:
        assert grads_k[name].dtype == torch.float32
        # bf16 activations: the kernels round once where torch rounds twice; compare at bf16 resolution
        rel = (grads_k[name] - grads_t[name]).norm() / grads_t[name].norm()
        assert rel < 0.05, (name, float(rel))


def test_kernels_switch_resolves_and_refuses_in_one_line(monkeypatch):
    assert resolve("auto", "cuda") == "torch" and resolve("torch", "cuda") == "torch"
    assert resolve("triton", "cuda") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("triton", "cpu") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="needs a CUDA device.*--train.kernels torch") as err:
        resolve("triton", "cpu")
    assert "\n" not in str(err.value)


def test_setup_applies_the_switch(tiny_llama, monkeypatch):
    from leantune.config import from_dict
    from leantune.train.setup import use_kernels

    cfg = from_dict({"model": "x"}, validate=False)
    cfg.train.kernels = "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        use_kernels(tiny_llama, cfg, torch.device("cpu"), print)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    lines = []
    try:
        assert use_kernels(tiny_llama, cfg, torch.device("cpu"), lines.append) == "triton"
        assert cross_entropy._fused_rows is not None and "RMSNorm" in lines[0]
    finally:
        cfg.train.kernels = "torch"
        assert use_kernels(tiny_llama, cfg, torch.device("cpu"), lines.append) == "torch"
    assert cross_entropy._fused_rows is None
