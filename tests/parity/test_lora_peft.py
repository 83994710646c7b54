"""leantune's LoRA against PEFT's, live on a tiny random Llama: no golden numbers, PEFT computes every reference.

From one seed both sides must build the same adapter on the same modules, compute the same outputs and
gradients, save and load each other's adapters with identical logits, build the same LoRA+ optimizer
groups and take the same step, and merge to the same weights.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.optimizers import create_loraplus_optimizer  # noqa: E402
from peft.tuners.lora import LoraLayer  # noqa: E402

from leantune.adapters.base import (  # noqa: E402
    adapter_modules,
    count_parameters,
    format_trainable,
    mark_only_adapters_trainable,
    unload,
)
from leantune.adapters.lora import inject_lora, loraplus_param_groups  # noqa: E402
from leantune.checkpoint.peft_format import load_adapter, save_adapter  # noqa: E402

CASES = {
    "all-linear": dict(targets="all-linear"),
    "rslora": dict(targets="all-linear", rslora=True),
    "target-list": dict(targets=["q_proj", "v_proj"]),
    "regex": dict(targets=r"model\.layers\.1\..*_proj"),
    "gaussian": dict(targets=["o_proj", "down_proj"], init="gaussian"),
    "dropout": dict(targets=["k_proj", "up_proj"], dropout=0.25),
}
RANK, ALPHA = 4, 8



def peft_config(targets="all-linear", rslora=False, init="default", dropout=0.0) -> LoraConfig:
    return LoraConfig(task_type="CAUSAL_LM", r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=targets,
                      use_rslora=rslora, init_lora_weights=True if init == "default" else init)


def build_both(base, seed=0, **case):
    """The same base with our LoRA and with PEFT's, each injected right after torch.manual_seed(seed)."""
    ours = copy.deepcopy(base)
    torch.manual_seed(seed)
    inject_lora(ours, RANK, ALPHA, **case)
    ours_rng = torch.get_rng_state()
    mark_only_adapters_trainable(ours)
    torch.manual_seed(seed)
    theirs = get_peft_model(copy.deepcopy(base), peft_config(**case))
    assert torch.equal(ours_rng, torch.get_rng_state()), "injection consumed a different number of random draws"
    return ours, theirs


def peft_layers(peft_model) -> dict:
    return {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def set_same_b(ours, theirs, seed=1) -> None:
    """B starts at zero, which makes A's gradient zero; give both sides the same nonzero B."""
    g = torch.Generator().manual_seed(seed)
    pl = peft_layers(theirs)
    with torch.no_grad():
        for path, a in adapter_modules(ours).items():
            b = torch.randn(a.lora_B.weight.shape, generator=g) * 0.1
            a.lora_B.weight.copy_(b)
            pl[path].lora_B["default"].weight.copy_(b)


def input_ids(vocab: int, seed=0) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def peft_name(name: str) -> str:
    """Our parameter name -> PEFT's: base_model.model.<path>.lora_A.default.weight."""
    return "base_model.model." + name.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")


@pytest.mark.parametrize("case", CASES)
def test_same_seed_gives_peft_adapter_on_same_modules(tiny_llama, case):
    ours, theirs = build_both(tiny_llama, **CASES[case])
    adapters, pl = adapter_modules(ours), peft_layers(theirs)
    assert list(adapters) == list(pl)  # same modules, same order
    for path, a in adapters.items():
        assert torch.equal(a.lora_A.weight, pl[path].lora_A["default"].weight), path
        assert torch.equal(a.lora_B.weight, pl[path].lora_B["default"].weight), path
        assert a.scaling == pl[path].scaling["default"]


@pytest.mark.parametrize("case", CASES)
def test_forward_and_gradients_match_peft(tiny_llama, case):
    ours, theirs = build_both(tiny_llama, **CASES[case])
    set_same_b(ours, theirs)
    ids = input_ids(tiny_llama.config.vocab_size)
    losses = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(5)  # the same dropout masks, drawn in the same order
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        losses.append(out)
    torch.testing.assert_close(losses[0].logits, losses[1].logits, atol=1e-5, rtol=0)
    pl = peft_layers(theirs)
    for path, a in adapter_modules(ours).items():
        torch.testing.assert_close(a.lora_A.weight.grad, pl[path].lora_A["default"].weight.grad, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.lora_B.weight.grad, pl[path].lora_B["default"].weight.grad, atol=1e-5, rtol=0)
        assert a.lora_A.weight.grad.abs().sum() > 0


def test_bf16_base_matches_peft_to_bf16_resolution(tiny_llama):
    ours, theirs = build_both(tiny_llama.to(torch.bfloat16), targets="all-linear")
    set_same_b(ours, theirs)
    pl = peft_layers(theirs)
    for path, a in adapter_modules(ours).items():
        assert a.lora_A.weight.dtype == pl[path].lora_A["default"].weight.dtype == torch.float32
        assert torch.equal(a.lora_A.weight, pl[path].lora_A["default"].weight)  # bf16-rounded, like PEFT's
    ids = input_ids(tiny_llama.config.vocab_size)
    with torch.no_grad():
        ours_logits, theirs_logits = ours(ids).logits, theirs(ids).logits
    assert ours_logits.dtype == torch.bfloat16
    # Our update runs in bf16 (A and B cast per call, as autocast would), PEFT's in fp32 over upcast
    # activations: a few bf16 roundings apart (2^-8 = 0.4% each), far below what a wrong update would cost
    # (B is non-zero here: the update moves the logits).
    scale = theirs_logits.float().abs().max()
    assert (ours_logits.float() - theirs_logits.float()).abs().max() <= 2e-2 * scale


@pytest.mark.parametrize("case", ["all-linear", "rslora", "target-list", "regex"])
def test_saved_adapter_loads_in_peft_with_identical_logits(tiny_llama, tmp_path, case):
    ours, theirs = build_both(tiny_llama, **CASES[case])
    set_same_b(ours, theirs)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny", rank=RANK, alpha=ALPHA, dropout=0.0,
                 targets=CASES[case]["targets"], rslora=CASES[case].get("rslora", False))
    loaded = PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path).eval()
    assert list(peft_layers(loaded)) == list(adapter_modules(ours))
    ids = input_ids(tiny_llama.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, ours.eval()(ids).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["all-linear", "rslora", "target-list", "regex"])
def test_adapter_config_has_what_peft_writes(tiny_llama, tiny_llama_dir, tmp_path, case):
    ours, theirs = build_both(tiny_llama, **CASES[case])
    save_adapter(ours, tmp_path / "ours", base_model_name_or_path=str(tiny_llama_dir), targets=CASES[case]["targets"])
    theirs.save_pretrained(tmp_path / "theirs")
    mine = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    ref = json.loads((tmp_path / "theirs" / "adapter_config.json").read_text())
    defaults = json.loads(json.dumps(LoraConfig().to_dict(), default=list))
    assert set(defaults) <= set(mine) and set(ref) <= set(mine), "PEFT writes fields leantune does not"
    assert mine["peft_version"] == peft.__version__, "PEFT was upgraded: review PEFT_LORA_DEFAULTS, then bump it"
    for key, value in ref.items():
        if key == "target_modules":  # PEFT writes a set in set order (all-linear: full paths); we sort names
            continue
        assert mine[key] == value, key
    own = {"r", "lora_alpha", "use_rslora", "target_modules", "base_model_name_or_path", "task_type", "inference_mode"}
    assert {k: v for k, v in mine.items() if k not in own} == {k: v for k, v in defaults.items() if k not in own}
    # what target_modules selects is what was adapted, as PEFT reads it back
    assert list(peft_layers(PeftModel.from_pretrained(copy.deepcopy(tiny_llama), tmp_path / "ours"))) == \
        list(adapter_modules(ours))


@pytest.mark.parametrize("case", ["all-linear", "rslora", "target-list", "gaussian"])
def test_peft_saved_adapter_loads_in_leantune_with_identical_logits(tiny_llama, tmp_path, case):
    ours, theirs = build_both(tiny_llama, **CASES[case])
    set_same_b(ours, theirs)
    theirs.save_pretrained(tmp_path)
    model = copy.deepcopy(tiny_llama)
    config = load_adapter(model, tmp_path)
    assert config["use_rslora"] == CASES[case].get("rslora", False)
    assert list(adapter_modules(model)) == list(peft_layers(theirs))
    ids = input_ids(tiny_llama.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, theirs.eval()(ids).logits, atol=1e-6, rtol=0)


def test_loraplus_groups_and_step_match_peft(tiny_llama):
    ours, theirs = build_both(tiny_llama, targets="all-linear")
    set_same_b(ours, theirs)
    lr, ratio, wd = 1e-3, 16.0, 0.1
    groups = loraplus_param_groups(ours, lr=lr, lr_ratio=ratio, weight_decay=wd)
    opt_ours = torch.optim.AdamW(groups)
    opt_theirs = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=ratio,
                                           loraplus_weight_decay=wd)
    names_theirs = {id(p): n for n, p in theirs.named_parameters()}
    names_ours = {id(p): peft_name(n) for n, p in ours.named_parameters()}
    assert len(opt_ours.param_groups) == len(opt_theirs.param_groups) == 4
    for g_ours, g_theirs in zip(opt_ours.param_groups, opt_theirs.param_groups):
        assert (g_ours["lr"], g_ours["weight_decay"]) == (g_theirs["lr"], g_theirs["weight_decay"])
        assert [names_ours[id(p)] for p in g_ours["params"]] == [names_theirs[id(p)] for p in g_theirs["params"]]
    ids = input_ids(tiny_llama.config.vocab_size)
    for model in (ours, theirs):
        model(input_ids=ids, labels=ids).loss.backward()
    params_theirs = dict(theirs.named_parameters())
    trained = [(p, params_theirs[peft_name(n)]) for n, p in ours.named_parameters() if p.requires_grad]
    for p, q in trained:  # the same gradients, to fp32 rounding (our fused LoRA node sums in another order)
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-5)
        # Adam's first step is ~lr * g / |g|: where g is ~0 its rounding decides the step, so one rounding
        # difference in a near-zero gradient moves a weight by up to lr*ratio. The groups are what is
        # compared here: both optimizers step from the same gradient.
        q.grad = p.grad.clone()
    opt_ours.step()
    opt_theirs.step()
    for p, q in trained:
        torch.testing.assert_close(p, q, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weights_match_peft_merge_and_unload(tiny_llama, dtype):
    ours, theirs = build_both(tiny_llama.to(dtype), targets="all-linear")
    set_same_b(ours, theirs)
    merged_ours = dict(unload(ours, merge=True).named_parameters())
    merged_theirs = dict(theirs.merge_and_unload().named_parameters())
    assert merged_ours.keys() == merged_theirs.keys()
    for name, p in merged_ours.items():
        assert p.dtype == dtype
        torch.testing.assert_close(p, merged_theirs[name], atol=1e-6 if dtype == torch.float32 else 0, rtol=0)


def test_trainable_counts_match_peft(tiny_llama):
    ours, theirs = build_both(tiny_llama, targets=["q_proj", "down_proj"])
    assert count_parameters(ours) == theirs.get_nb_trainable_parameters()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        theirs.print_trainable_parameters()
    assert format_trainable(ours) == printed.getvalue().strip()
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n.removeprefix("base_model.model.").replace(".default", "") for n, p in theirs.named_parameters()
         if p.requires_grad]
