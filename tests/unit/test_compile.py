"""train.compile: each decoder layer compiled on its own gives the eager step's loss and gradients.

The inductor tests build C++ kernels (g++) for a 2-layer Llama: ~20 s each on a quiet core, most of it
the one-off compile.
"""

from __future__ import annotations

import pytest
import torch

from leantune.adapters.base import mark_only_adapters_trainable
from leantune.adapters.lora import inject_lora
from leantune.errors import ConfigError
from leantune.train import compile as lt_compile
from leantune.train.step import micro_batch_loss


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _lora_model(model, dtype=torch.float32):
    model = model.to(dtype)
    torch.manual_seed(1)  # the same A and B in every copy
    inject_lora(model, rank=4, alpha=8)
    mark_only_adapters_trainable(model)
    with torch.no_grad():  # B = 0 at init would give A no gradient: make both factors live
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model.train()


def _step(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    n = ids.numel() - ids.shape[0]
    loss, _ = micro_batch_loss(model, {"input_ids": ids, "labels": ids.clone(), "num_label_tokens": n},
                               normalizer=n, chunk=32)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_decoder_layers_are_the_models_repeated_blocks(tiny_llama):
    layers = lt_compile.decoder_layers(tiny_llama)
    assert layers == list(tiny_llama.model.layers)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_lora_layer_traces_as_one_graph(tiny_llama, dtype):
    # The fused LoRA node (a custom autograd.Function; over bf16 with fp32 masters cast inside) must not
    # split the layer: a break per layer would leave the elementwise chains between graphs unfused.
    model = _lora_model(tiny_llama, dtype)
    x = torch.randn(2, 8, model.config.hidden_size, dtype=dtype, requires_grad=True)
    pos = torch.arange(8)[None].expand(2, -1)
    out = torch._dynamo.explain(model.model.layers[0])(
        x, attention_mask=None, position_ids=pos, position_embeddings=model.model.rotary_emb(x, pos))
    assert (out.graph_count, out.graph_break_count) == (1, 0), [b.reason for b in out.break_reasons]


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_compiled_lora_step_matches_eager(tiny_llama_dir, checkpointing):
    from transformers import AutoModelForCausalLM

    def build():
        model = _lora_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    eager, compiled = build(), build()
    keys = list(compiled.state_dict())
    assert lt_compile.compile_layers(compiled, backend="inductor") == compiled.config.num_hidden_layers
    ids = torch.randint(0, compiled.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # the second call runs the cached kernels
        loss_e, grads_e = _step(eager, ids)
        loss_c, grads_c = _step(compiled, ids)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        assert grads_c.keys() == grads_e.keys() and len(grads_e) == 2 * 7 * compiled.config.num_hidden_layers
        for k in grads_e:
            torch.testing.assert_close(grads_c[k], grads_e[k], rtol=1e-4, atol=1e-6, msg=k)
    assert list(compiled.state_dict()) == keys  # compiled in place: adapters save under the same names
    assert lt_compile.graph_breaks() == 0


def test_compile_on_cpu_without_a_cxx_compiler_refuses_with_the_fix(tiny_llama, monkeypatch):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(lt_compile.shutil, "which", lambda name: None)
    with pytest.raises(ConfigError, match="train.compile: false"):
        lt_compile.compile_layers(tiny_llama)
