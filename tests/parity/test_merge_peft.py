"""Adapter combination against PEFT's `add_weighted_adapter`, live: for every combination type PEFT
implements, the combined adapter's update (B @ A * scaling) equals PEFT's, module by module.

Two random LoRAs (nonzero B) are saved in PEFT format, loaded into one PeftModel, combined there; ours
reads the same two folders. DARE: PEFT draws its masks from the global generator after injecting (and
randomly initialising) the new adapter; the test reseeds at that point (right after `_freeze_adapter`),
so one seed means one mask on both sides.
"""

from __future__ import annotations

import copy

import pytest
import torch

peft = pytest.importorskip("peft")
import peft.tuners.lora.model as peft_lora_model  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

from leantune.merge.combine import combine, read_adapter  # noqa: E402

SEED = 1234
TARGETS = ["q_proj", "v_proj", "down_proj"]



def _random_adapter(base, folder, rank, alpha, seed, targets=TARGETS):
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    d = tmp_path_factory.mktemp("merge-parity")
    same = [_random_adapter(base, d / "a", 4, 8, 1), _random_adapter(base, d / "b", 4, 16, 2)]
    mixed = [same[0], _random_adapter(base, d / "c", 6, 6, 3, targets=["q_proj", "o_proj"])]
    return base, same, mixed


def _peft_combined(base, folders, weights, combination_type, **kw):
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folders[0]), adapter_name="a0")
    for i, f in enumerate(folders[1:], 1):
        model.load_adapter(str(f), adapter_name=f"a{i}")
    original = peft_lora_model._freeze_adapter

    def reseed_after_injection(*args, **kwargs):
        original(*args, **kwargs)
        torch.manual_seed(SEED)

    peft_lora_model._freeze_adapter = reseed_after_injection
    try:
        model.add_weighted_adapter([f"a{i}" for i in range(len(folders))], weights, "merged",
                                   combination_type=combination_type, **kw)
    finally:
        peft_lora_model._freeze_adapter = original
    deltas = {}
    for path, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            deltas[path] = module.get_delta_weight("merged")
    order = [p for p, _ in base.named_modules()]
    return deltas, order


def _check(base, folders, weights, method, density=None, rank=None):
    kw = {"density": density} if density is not None else {}
    if rank is not None:
        kw["svd_rank"] = rank
    theirs, order = _peft_combined(base, folders, weights, method, **kw)
    factors, r, used = combine([read_adapter(f) for f in folders], weights, method, density=density, rank=rank,
                               seed=SEED, order=order)
    assert used == method
    assert set(factors) == set(theirs)
    for path, (a, b) in factors.items():
        torch.testing.assert_close(b @ a, theirs[path], rtol=1e-5, atol=1e-5, msg=f"{method}: {path}")
    return factors, r


FACTOR_CASES = [("linear", None), ("ties", 0.5), ("dare_linear", 0.6), ("dare_ties", 0.6),
                ("magnitude_prune", 0.4)]


@pytest.mark.parametrize("method,density", FACTOR_CASES)
def test_factor_space_methods_equal_peft(pair, method, density):
    base, same, _ = pair
    _check(base, same, [0.7, -0.4], method, density)


@pytest.mark.parametrize("method,density", [("cat", None), ("svd", None), ("ties_svd", 0.5),
                                            ("dare_linear_svd", 0.6), ("dare_ties_svd", 0.6),
                                            ("magnitude_prune_svd", 0.4)])
def test_mixed_rank_methods_equal_peft(pair, method, density):
    base, _, mixed = pair  # ranks 4 and 6, and different target modules
    factors, r = _check(base, mixed, [1.0, -0.5], method, density, rank=8 if method != "cat" else None)
    assert r == (10 if method == "cat" else 8)
    assert all(a.shape[0] == r and b.shape[1] == r for a, b in factors.values())


def test_dare_depends_on_the_seed(pair):
    base, same, _ = pair
    adapters = [read_adapter(f) for f in same]
    one, _, _ = combine(adapters, [1.0, 1.0], "dare_linear", density=0.5, seed=1)
    two, _, _ = combine(adapters, [1.0, 1.0], "dare_linear", density=0.5, seed=2)
    again, _, _ = combine(adapters, [1.0, 1.0], "dare_linear", density=0.5, seed=1)
    path = next(iter(one))
    assert not torch.equal(one[path][0], two[path][0])
    assert torch.equal(one[path][0], again[path][0])
