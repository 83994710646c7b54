"""leantune's prefix tuning against PEFT 0.21's, live on the tiny Llama (grouped-query attention: the
prefix has the key/value width): same init from one seed, same logits, loss and gradients, the same
generated tokens, and each side loads the other's saved adapter with identical logits."""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import PeftModel, PrefixTuningConfig, get_peft_model  # noqa: E402

from leantune.adapters.base import adapter_modules, mark_only_adapters_trainable, prepare_inputs  # noqa: E402
from leantune.adapters.prefix import inject_prefix  # noqa: E402
from leantune.checkpoint.adapter_io import load_adapter, save_adapter  # noqa: E402
from tests.parity.conftest import greedy_by_full_forward, ours_forward, padded_batch  # noqa: E402

N = 4
CASES = {"plain": {}, "projection": {"projection": True, "projection_hidden": 24}}



def build_both(base, projection=False, projection_hidden=None):
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    inject_prefix(ours, N, projection, projection_hidden)
    mark_only_adapters_trainable(ours)
    torch.manual_seed(0)
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection,
                                **({"encoder_hidden_size": projection_hidden} if projection_hidden else {}))
    theirs = get_peft_model(copy.deepcopy(base), config)
    return ours, theirs


def our_prefix(model):
    (adapter,) = adapter_modules(model).values()
    return adapter


def peer_params(theirs) -> list[torch.nn.Parameter]:
    encoder = theirs.prompt_encoder["default"]
    return [encoder.embedding.weight] + ([] if not encoder.prefix_projection else list(encoder.transform.parameters()))


@pytest.fixture
def batch():
    return padded_batch(2)


@pytest.mark.parametrize("case", CASES)
def test_same_seed_same_prefix_logits_loss_and_gradients(tiny_llama, batch, case):
    ids, mask = batch
    ours, theirs = build_both(tiny_llama, **CASES[case])
    mine = our_prefix(ours).adapter_parameters()
    peers = peer_params(theirs)
    assert [p.shape for p in mine] == [p.shape for p in peers]
    for a, b in zip(mine, peers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    labels = ids.masked_fill(mask == 0, -100)
    ours.train(), theirs.train()
    a, b = ours_forward(ours, ids, mask, labels), theirs(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-6)
    a.loss.backward()
    b.loss.backward()
    for p, q in zip(mine, peers):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_saved_adapters_load_both_ways_with_identical_logits(tiny_llama, batch, tmp_path, case):
    ids, mask = batch
    ours, theirs = build_both(tiny_llama, **CASES[case])
    save_adapter(ours.eval(), tmp_path / "ours")
    in_peft = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "ours").eval()
    torch.testing.assert_close(in_peft(input_ids=ids, attention_mask=mask).logits,
                               ours_forward(ours, ids, mask).logits, rtol=0, atol=1e-6)
    theirs.save_pretrained(tmp_path / "theirs")
    in_ours = copy.deepcopy(tiny_llama)
    load_adapter(in_ours, tmp_path / "theirs")
    torch.testing.assert_close(ours_forward(in_ours, ids, mask).logits,
                               theirs.eval()(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=1e-6)


def test_generate_keeps_the_prefix_attached_like_peft(tiny_llama):
    """Our generate with the prefix attached = greedy decoding by full forwards through PEFT's model."""
    ours, theirs = build_both(tiny_llama)
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    mask = torch.ones_like(ids)
    opts = dict(max_new_tokens=6, do_sample=False, pad_token_id=3)
    with torch.no_grad():
        inputs = prepare_inputs(ours.eval(), {"input_ids": ids, "attention_mask": mask}, generation=True)
        out_ours = ours.generate(**inputs, **opts)[0, inputs["input_ids"].shape[1]:]
        plain = tiny_llama.generate(input_ids=ids, attention_mask=mask, **opts)[0, ids.shape[1]:]
    theirs.eval()
    reference = greedy_by_full_forward(lambda x: theirs(input_ids=x, use_cache=False).logits, ids, 6)
    assert out_ours.tolist() == reference
    assert out_ours.tolist() != plain.tolist()  # the prefix really steers generation
