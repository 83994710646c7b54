"""Folding an adapter into its base file by file (leantune.merge.fold): a sharded base keeps its shards
and index and loads in plain transformers with base + adapter logits; a bf16 base is written in bf16
within bf16's rounding; an adapter for another base writes nothing."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from leantune.adapters.lora import inject_lora
from leantune.checkpoint.peft_format import load_adapter, save_adapter
from leantune.errors import ModelError
from leantune.merge.combine import read_adapter
from leantune.merge.fold import fold_into_base

IDS = torch.tensor([[5, 17, 42, 99, 7, 230, 11, 64]])


def _random_adapter(model, folder, targets=("q_proj", "down_proj")):
    torch.manual_seed(0)
    inject_lora(model, rank=4, alpha=8, targets=list(targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    save_adapter(model, folder)
    return folder


def _logits(folder_or_model, dtype, adapter=None):
    model = folder_or_model
    if not isinstance(model, torch.nn.Module):
        model = AutoModelForCausalLM.from_pretrained(folder_or_model, dtype=dtype).eval()
    if adapter is not None:
        load_adapter(model, adapter)
    with torch.no_grad():
        return model(IDS).logits.float()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 5e-2)])
def test_sharded_base_folds_shard_by_shard(tiny_llama, tmp_path, dtype, tol):
    base = tmp_path / "base"
    tiny_llama.to(dtype).save_pretrained(base, max_shard_size="100KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 1
    adapter = _random_adapter(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), tmp_path / "adapter")
    lora = read_adapter(adapter)
    out = fold_into_base(base, lora.factors, lora.scaling, tmp_path / "merged")
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    assert json.loads((out / "model.safetensors.index.json").read_text()) == \
        json.loads((base / "model.safetensors.index.json").read_text())
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=dtype).eval()
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    expected = _logits(base, dtype, adapter)
    torch.testing.assert_close(_logits(merged, dtype), expected, rtol=0, atol=tol)
    assert not torch.allclose(_logits(base, dtype), expected, atol=tol)


def test_adapter_for_another_base_writes_nothing(tiny_llama_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2))
    adapter = _random_adapter(other, tmp_path / "adapter")
    lora = read_adapter(adapter)
    with pytest.raises(ModelError, match="trained for a different base"):
        fold_into_base(tiny_llama_dir, lora.factors, lora.scaling, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_a_dora_adapter_is_refused_not_folded_as_plain_lora(tiny_llama, tmp_path):
    """DoRA's W' = m (W + sBA) / ||W + sBA|| is no delta: folding only sBA would write a wrong model."""
    import pytest

    from leantune.adapters.base import mark_only_adapters_trainable, set_module
    from leantune.adapters.dora import DoraLinear
    from leantune.checkpoint.adapter_io import save_adapter
    from leantune.errors import ModelError
    from leantune.merge.combine import read_adapter

    for path in [p for p, _ in tiny_llama.named_modules() if p.endswith("q_proj")]:
        set_module(tiny_llama, path, DoraLinear(tiny_llama.get_submodule(path), 2, 4))
    mark_only_adapters_trainable(tiny_llama)
    save_adapter(tiny_llama, tmp_path / "dora")
    with pytest.raises(ModelError, match="DoRA adapter"):
        read_adapter(tmp_path / "dora")
