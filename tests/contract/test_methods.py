"""The contract every fine-tuning method keeps, as one table run over every registered method.

A method that `method:` accepts but that has no row here fails `test_every_method_has_a_row`. Each row
states the method's trainable-parameter formula on the tiny Llama (hidden h, intermediate i, key/value
width kv, L layers), which must equal both the count the method itself declares
(`Method.count_parameters`, from the model's structure on the meta device) and the count after attaching,
and what it promises: the untrained adapter leaves the output unchanged, and merging folds it into the
base weights. Rows build the method from its config section exactly as `leantune train` does
(config.from_dict, then METHODS[method].prepare). The toy method (toy_method.py, one file) has its row too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import torch

from leantune.adapters.base import (
    ADAPTERS,
    METHODS,
    adapter_modules,
    format_trainable,
    merge_adapters,
    prepare_inputs,
    unmerge_adapters,
)
from leantune.checkpoint.adapter_io import load_adapter, save_adapter
from leantune.config import from_dict
from leantune.errors import ModelError

from . import toy_method

RANK, SIZE = 4, 8


def dims(model) -> dict:
    c = model.config
    return dict(h=c.hidden_size, i=c.intermediate_size, L=c.num_hidden_layers,
                kv=c.num_key_value_heads * (c.hidden_size // c.num_attention_heads))


def lora_count(h, i, L, kv, r=RANK) -> int:  # r * (in + out) over q, k, v, o, gate, up, down
    return L * r * ((h + h) + 2 * (h + kv) + (h + h) + 2 * (h + i) + (i + h))


@dataclass
class Row:
    section: dict                 # the method's config section, as YAML would give it
    formula: Callable             # trainable parameters from dims(model)
    identity_at_init: bool = True
    mergeable: bool = True
    extra: dict = field(default_factory=dict)  # other top-level config keys
    whole_model: bool = False     # trains the model's own weights (full/freeze): nothing added, saved as HF


ROWS: dict[str, Row] = {
    "lora": Row({"rank": RANK, "alpha": 8}, lambda h, i, L, kv: lora_count(h, i, L, kv)),
    # DoRA: LoRA plus one magnitude per output feature of each adapted layer.
    "dora": Row({"rank": RANK, "alpha": 8},
                lambda h, i, L, kv: lora_count(h, i, L, kv) + L * (h + kv + kv + h + i + i + h)),
    # IA3 (Llama defaults): k_proj and v_proj outputs (kv each), down_proj input (i).
    "ia3": Row({}, lambda h, i, L, kv: L * (kv + kv + i)),
    # Houlsby: two adapters per block, each 2*h*size + size + h.
    "bottleneck": Row({"style": "houlsby", "size": SIZE},
                      lambda h, i, L, kv: 2 * L * (2 * h * SIZE + SIZE + h), mergeable=False),
    # Prompt tuning: n virtual-token embeddings of width h; random tokens change the output from the start.
    "prompt": Row({"virtual_tokens": 5}, lambda h, i, L, kv: 5 * h, identity_at_init=False, mergeable=False),
    # Prefix tuning: n key and value vectors of width kv in each of L layers.
    "prefix": Row({"virtual_tokens": 5}, lambda h, i, L, kv: 5 * L * 2 * kv, identity_at_init=False, mergeable=False),
    # Full: every weight of the model (its own count, no formula to restate); freeze: the last decoder layer
    # (q, o: h*h; k, v: h*kv; gate, up, down: h*i; two norms: h) plus the final norm.
    "full": Row({}, lambda h, i, L, kv: None, mergeable=False, whole_model=True),
    "freeze": Row({"train_last_layers": 1, "train_modules": ["model.norm"]},
                  lambda h, i, L, kv: 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h + h, mergeable=False, whole_model=True),
    # The toy (toy_method.py): one scale per output feature of o_proj (h) and down_proj (h) in each layer.
    toy_method.NAME: Row({"targets": ["o_proj", "down_proj"]}, lambda h, i, L, kv: L * 2 * h),
}
# With the reparameterisation MLP: E (n, kv), then kv -> hidden -> L*2*kv, both Linears with a bias.
PREFIX_MLP = Row({"virtual_tokens": 5, "projection": True, "projection_hidden": 16},
                 lambda h, i, L, kv: 5 * kv + (kv * 16 + 16) + (16 * L * 2 * kv + L * 2 * kv),
                 identity_at_init=False, mergeable=False)
PFEIFFER = Row({"style": "pfeiffer", "size": SIZE}, lambda h, i, L, kv: L * (2 * h * SIZE + SIZE + h), mergeable=False)


def test_every_method_has_a_row():
    from leantune.config import METHODS as CONFIG_METHODS

    assert set(METHODS) == set(ROWS), "each registered method needs exactly one row in ROWS"
    assert set(CONFIG_METHODS) == set(METHODS), "a registered method that the config cannot choose"
    assert {m for m, r in ROWS.items() if not r.whole_model} == set(ADAPTERS), "an adapter row without an adapter"
    assert all(METHODS[m].whole_model == r.whole_model and METHODS[m].mergeable == r.mergeable for m, r in ROWS.items())


def test_every_adapter_method_has_a_format_that_reads_what_it_writes():
    from leantune.adapters.format import BY_PEFT_TYPE, format_for

    for name, cls in ADAPTERS.items():
        fmt = format_for(cls)  # raises, naming the fix, for a method without one
        assert BY_PEFT_TYPE[fmt.peft_type] is fmt, name
    assert format_for(ADAPTERS["dora"]) is format_for(ADAPTERS["lora"])  # DoRA is PEFT's LORA with use_dora


def test_a_method_cannot_take_a_name_or_section_already_taken():
    from dataclasses import dataclass

    from leantune.adapters.base import Adapter, Method

    with pytest.raises(TypeError, match="already registered"):
        class Again(Adapter, method="lora"):
            pass

    @dataclass
    class Clash:
        x: int = 1

    with pytest.raises(TypeError, match="would shadow RunConfig.train"):
        class Shadow(Method, method="shadow_test"):
            config_cls, config_section = Clash, "train"
    assert "shadow_test" not in METHODS  # refused whole: nothing half-registered


CASES = [pytest.param(m, ROWS[m], id=m) for m in ROWS] + [pytest.param("bottleneck", PFEIFFER, id="bottleneck-pfeiffer"),
                                                          pytest.param("prefix", PREFIX_MLP, id="prefix-projection")]


def section_of(method: str, row: Row):
    """The method's config section as `leantune train` builds it from YAML (None: it has none)."""
    cls = METHODS[method]
    raw = {"method": method, **row.extra, **({cls.config_section: row.section} if cls.config_section else {})}
    return from_dict(raw, validate=False).sections.get(cls.config_section)


def attach(model, method: str, row: Row):
    """Build the method from its config section, as the train loop does."""
    torch.manual_seed(0)
    METHODS[method].prepare(model, section_of(method, row))
    return model


def on_meta(model):
    """The same architecture with no weights: what a planner sees before loading anything."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model.config)


def forward(model, ids, labels=None):
    """The model's forward as the train step and generate call it: through the adapters' input hook."""
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels is not None:
        inputs["labels"] = labels
    return model(**prepare_inputs(model, inputs))


def perturb(model, seed: int = 1) -> None:
    """Stand-in for training: move every trainable tensor off its init (a zero B would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@pytest.fixture
def ids():
    return torch.randint(6, 100, (2, 11), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(("method", "row"), CASES)
def test_forward_and_backward_reach_every_trainable_parameter(tiny_llama, ids, method, row):
    model = attach(tiny_llama, method, row).train()
    perturb(model)  # from the exact init, LoRA's A (B = 0) would rightly get no gradient
    loss = forward(model, ids, labels=ids).loss
    loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable)
    assert all(float(p.grad.abs().sum()) > 0 for _, p in trainable), [n for n, p in trainable if not p.grad.any()]
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize(("method", "row"), CASES)
def test_untrained_adapter_leaves_the_output_unchanged_where_promised(tiny_llama, ids, method, row):
    reference = tiny_llama(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    model = attach(copy.deepcopy(tiny_llama), method, row)
    if row.identity_at_init:
        torch.testing.assert_close(forward(model, ids).logits, reference, rtol=0, atol=1e-6)
    else:  # virtual tokens are attended to from the first step: the row's claim is that they act at once
        logits = forward(model, ids).logits[:, -ids.shape[1]:]  # prompt tuning also returns its virtual positions
        assert not torch.allclose(logits, reference, atol=1e-6)


@pytest.mark.parametrize(("method", "row"), CASES)
def test_trainable_count_is_the_formula_and_is_printed(tiny_llama, method, row, capsys):
    total_before = sum(p.numel() for p in tiny_llama.parameters())
    expected = row.formula(**dims(tiny_llama))
    expected = total_before if expected is None else expected  # full: every parameter
    assert METHODS[method].count_parameters(on_meta(tiny_llama), section_of(method, row)) == expected
    model = attach(tiny_llama, method, row)
    line = format_trainable(model)
    print(line)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
    # adapters add their parameters to an untouched base; whole-model methods add none
    total = total_before if row.whole_model else total_before + expected
    assert capsys.readouterr().out.strip() == (
        f"trainable params: {expected:,d} || all params: {total:,d} || trainable%: {100 * expected / total:.4f}")


@pytest.mark.parametrize(("method", "row"), CASES)
def test_save_and_load_round_trip_gives_equal_logits(tiny_llama, tiny_tokenizer, ids, tmp_path, method, row):
    if row.whole_model:  # saved as a whole HF folder, read back by plain transformers
        from transformers import AutoModelForCausalLM

        from leantune.adapters.whole_model import save_model

        model = attach(tiny_llama, method, row)
        perturb(model)
        save_model(model, tiny_tokenizer, tmp_path / "model")
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
        torch.testing.assert_close(forward(loaded, ids).logits, forward(model, ids).logits, rtol=0, atol=0)
        return
    fresh = copy.deepcopy(tiny_llama)
    model = attach(tiny_llama, method, row)
    perturb(model)
    save_adapter(model, tmp_path / "adapter")
    load_adapter(fresh, tmp_path / "adapter")
    assert {type(a) for a in adapter_modules(fresh).values()} == {ADAPTERS[method]}
    torch.testing.assert_close(forward(fresh, ids).logits, forward(model, ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("method", "row"), CASES)
def test_merged_equals_unmerged_where_the_method_merges(tiny_llama, ids, method, row):
    weights = {n: p.clone() for n, p in tiny_llama.state_dict().items()}
    model = attach(tiny_llama, method, row)
    perturb(model)
    unmerged = forward(model, ids).logits
    if row.whole_model:  # the trained weights are the model: nothing is held apart to merge
        assert not adapter_modules(model)
        return
    if not row.mergeable:
        with pytest.raises(ModelError, match="cannot be merged"):  # said, not silently skipped
            merge_adapters(model)
        return
    merge_adapters(model)
    assert all(a.merged for a in adapter_modules(model).values())
    torch.testing.assert_close(forward(model, ids).logits, unmerged, rtol=0, atol=1e-5)
    unmerge_adapters(model)
    restored = {n.replace(".base_layer", ""): p for n, p in model.state_dict().items()}
    for name, w in weights.items():  # unmerging gives the base weights back (up to fp32 rounding)
        torch.testing.assert_close(restored[name], w, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def nf4_llama(tiny_llama_dir):
    pytest.importorskip("bitsandbytes")
    from leantune.config import QuantConfig
    from leantune.models.load import load_model

    return load_model(str(tiny_llama_dir), dtype=torch.float32, device="cpu", quant=QuantConfig(bits=4))


@pytest.mark.parametrize(("method", "row"), CASES)
def test_trains_on_a_4bit_base_or_says_why_not(nf4_llama, ids, method, row):
    """QLoRA-style: every method trains over an NF4 base; merging into packed 4-bit weights is refused.
    Whole-model methods cannot: the config refuses them a quantized base before loading anything."""
    if row.whole_model:
        from leantune.errors import ConfigError

        with pytest.raises(ConfigError, match="cannot hold"):
            from_dict({"model": "m", "data": {"path": "d.jsonl"}, "method": method, "quant": {"bits": 4},
                       "freeze": row.section})
        return
    model = attach(copy.deepcopy(nf4_llama), method, row).train()
    perturb(model)
    forward(model, ids, labels=ids).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and float(p.grad.abs().sum()) > 0 for _, p in trainable)
    if row.mergeable:
        with pytest.raises(ModelError, match="quantized"):
            merge_adapters(model)
