"""Several adapters live on one base (leantune.serve.multi_lora): switching matches PEFT's set_adapter, a
weighted stack equals the base with the weighted deltas folded in by hand, disabling gives the base,
merge/unmerge round-trips, and asking for what is not loaded is a one-line error."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from leantune.errors import ConfigError, ModelError
from leantune.merge.combine import read_adapter
from leantune.serve.multi_lora import load_adapters

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

IDS = torch.tensor([[5, 17, 42, 99, 7, 230, 11, 64]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    d = tmp_path_factory.mktemp("multi")
    out = {}
    for name, (r, targets, seed) in {"a": (4, ["q_proj", "v_proj"], 1), "b": (2, ["v_proj", "up_proj"], 2)}.items():
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        m.save_pretrained(d / name)
        out[name] = d / name
    return out


def test_switching_matches_peft_set_adapter(tiny_llama, folders):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), str(folders["a"]), adapter_name="a")
        theirs.load_adapter(str(folders["b"]), adapter_name="b")
    ours = load_adapters(tiny_llama, folders)
    for name in ("a", "b", "a"):
        ours.use(name)
        theirs.set_adapter(name)
        assert ours.active == {name: 1.0}
        torch.testing.assert_close(_logits(tiny_llama), _logits(theirs), rtol=0, atol=1e-5)


def test_weighted_stack_equals_the_deltas_folded_by_hand(tiny_llama, folders):
    weights = {"a": 0.7, "b": -0.4}
    by_hand = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        for name, w in weights.items():
            lora = read_adapter(folders[name])
            for path in lora.factors:
                by_hand.get_submodule(path).weight += w * lora.delta(path)
    adapters = load_adapters(tiny_llama, folders)
    adapters.stack(weights)
    stacked = _logits(tiny_llama)
    torch.testing.assert_close(stacked, _logits(by_hand), rtol=0, atol=1e-5)
    for layer in adapters.layers().values():
        layer.merge()
    torch.testing.assert_close(_logits(tiny_llama), stacked, rtol=0, atol=1e-5)
    with pytest.raises(ModelError, match="unmerge"):
        adapters.use("a")
    for layer in adapters.layers().values():
        layer.unmerge()
    torch.testing.assert_close(_logits(tiny_llama), stacked, rtol=0, atol=1e-5)


def test_disable_gives_the_base_and_restores_the_active_set(tiny_llama, folders):
    base = _logits(tiny_llama)
    adapters = load_adapters(tiny_llama, folders, active="b")
    with_b = _logits(tiny_llama)
    assert not torch.allclose(with_b, base)
    with adapters.disabled():
        torch.testing.assert_close(_logits(tiny_llama), base, rtol=0, atol=0)
    assert adapters.active == {"b": 1.0}
    torch.testing.assert_close(_logits(tiny_llama), with_b, rtol=0, atol=0)


def test_unknown_or_duplicate_names_are_one_line_errors(tiny_llama, folders):
    adapters = load_adapters(tiny_llama, folders)
    with pytest.raises(ConfigError, match="no adapter named 'c' is loaded; loaded: a, b"):
        adapters.use("c")
    with pytest.raises(ConfigError, match="already loaded"):
        adapters.add("a", folders["b"])
    assert adapters.active == {"a": 1.0}


def test_adapter_of_another_base_is_refused_before_any_layer_changes(folders):
    from transformers import LlamaConfig, LlamaForCausalLM

    from leantune.adapters.base import adapter_modules

    other = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ModelError, match="trained for a different base"):
        load_adapters(other, folders)
    assert adapter_modules(other) == {}
