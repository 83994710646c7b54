"""leantune's DoRA and IA3 against PEFT 0.21's, live on a tiny random Llama: PEFT computes every reference.

From one seed both sides build the same adapter; with the same (trained-looking) weights they compute
the same logits and gradients (<= 1e-5 in fp32), print the same trainable-parameter line, merge to the
same weights, and each loads the other's saved adapter with identical logits.
"""

from __future__ import annotations

import contextlib
import copy
import io

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402

from leantune.adapters.base import format_trainable, mark_only_adapters_trainable, unload  # noqa: E402
from leantune.adapters.ia3 import inject_ia3  # noqa: E402
from leantune.adapters.lora import _inject  # noqa: E402
from leantune.adapters.dora import DoraLinear  # noqa: E402
from leantune.checkpoint.adapter_io import load_adapter, save_adapter  # noqa: E402

RANK, ALPHA = 4, 8


def ours_dora(model, targets="all-linear", rslora=False, dropout=0.0):
    return _inject(DoraLinear, model, RANK, ALPHA, dropout, targets, rslora, "default")


CASES = {  # name: (build ours, PEFT config)
    "dora": (ours_dora, LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA, use_dora=True,
                                   target_modules="all-linear")),
    "dora-rslora-qv": (lambda m: ours_dora(m, ["q_proj", "v_proj"], rslora=True),
                       LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA, use_dora=True, use_rslora=True,
                                  target_modules=["q_proj", "v_proj"])),
    # Active dropout takes DoRA's other branch: x @ W^T recomputed on the dropped-out input.
    "dora-dropout": (lambda m: ours_dora(m, ["k_proj", "down_proj"], dropout=0.2),
                     LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA, use_dora=True, lora_dropout=0.2,
                                target_modules=["k_proj", "down_proj"])),
    "ia3": (inject_ia3, IA3Config(task_type="CAUSAL_LM")),
    "ia3-listed": (lambda m: inject_ia3(m, ["q_proj", "up_proj", "o_proj"], ["o_proj"]),
                   IA3Config(task_type="CAUSAL_LM", target_modules=["q_proj", "up_proj", "o_proj"],
                             feedforward_modules=["o_proj"])),
}



def our_name(peft_name: str) -> str:
    """PEFT's parameter name -> ours (the same tensor, possibly reshaped)."""
    name = peft_name.removeprefix("base_model.model.").replace(".default", "")
    return name.replace("lora_magnitude_vector.weight", "magnitude").replace("ia3_l", "scale")


def trainable(model) -> dict[str, torch.Tensor]:
    return {our_name(n): p for n, p in model.named_parameters() if p.requires_grad}


def build_both(base, case):
    inject, config = CASES[case]
    ours = copy.deepcopy(base)
    torch.manual_seed(0)
    inject(ours)
    mark_only_adapters_trainable(ours)
    torch.manual_seed(0)
    theirs = get_peft_model(copy.deepcopy(base), copy.deepcopy(config))
    return ours, theirs


def trained(ours, theirs):
    """Give both the same off-init weights, as after some training."""
    g = torch.Generator().manual_seed(1)
    mine, peers = trainable(ours), trainable(theirs)
    with torch.no_grad():
        for name, p in mine.items():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            peers[name].copy_(p.view_as(peers[name]))
    return ours, theirs


@pytest.fixture
def ids():
    return torch.randint(6, 100, (2, 13), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("case", CASES)
def test_same_seed_builds_the_same_adapter_as_peft(tiny_llama, case):
    ours, theirs = build_both(tiny_llama, case)
    mine, peers = trainable(ours), trainable(theirs)
    assert set(mine) == set(peers)
    for name, p in mine.items():
        torch.testing.assert_close(p.flatten(), peers[name].flatten(), rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_trainable_line_matches_print_trainable_parameters(tiny_llama, case):
    ours, theirs = build_both(tiny_llama, case)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        theirs.print_trainable_parameters()
    assert format_trainable(ours) == out.getvalue().strip()


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_peft(tiny_llama, ids, case):
    ours, theirs = trained(*build_both(tiny_llama, case))
    ours.train(), theirs.train()
    torch.manual_seed(2)  # the same dropout masks on both sides
    out_ours = ours(input_ids=ids, labels=ids)
    torch.manual_seed(2)
    out_theirs = theirs(input_ids=ids, labels=ids)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, rtol=0, atol=1e-5)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    peers = trainable(theirs)
    for name, p in trainable(ours).items():
        torch.testing.assert_close(p.grad.flatten(), peers[name].grad.flatten(), rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("case", CASES)
def test_our_saved_adapter_loads_in_peft_with_identical_logits(tiny_llama, ids, tmp_path, case):
    ours, _ = trained(*build_both(tiny_llama, case))
    save_adapter(ours, tmp_path / "a")
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "a").eval()
    torch.testing.assert_close(loaded(ids).logits, ours.eval()(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_peft_saved_adapter_loads_in_ours_with_identical_logits(tiny_llama, ids, tmp_path, case):
    _, theirs = trained(*build_both(tiny_llama, case))
    theirs.save_pretrained(tmp_path / "a")
    fresh = copy.deepcopy(tiny_llama)
    load_adapter(fresh, tmp_path / "a")
    torch.testing.assert_close(fresh(ids).logits, theirs.eval()(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("case", CASES)
def test_merge_gives_peft_merge_and_unload_weights(tiny_llama, case):
    ours, theirs = trained(*build_both(tiny_llama, case))
    merged_ours = unload(ours, merge=True).state_dict()
    merged_theirs = theirs.merge_and_unload().state_dict()
    assert set(merged_ours) == set(merged_theirs)
    for name, w in merged_theirs.items():
        torch.testing.assert_close(merged_ours[name], w, rtol=0, atol=1e-6, msg=name)
