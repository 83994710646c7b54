"""Serving over a quantized base (QLoRA's NF4/FP4 with and without double quantization, LLM.int8): the base is
quantized once by leantune's own loader, as in training, and each adapted Linear calls the bitsandbytes layer
for W x. The reference is live: PEFT over transformers' own bitsandbytes base (BitsAndBytesConfig), each
adapter generating alone. A mixed batch of 4 adapters (LoRA r4/r8, rsLoRA r2 on all linears, DoRA r4) and 2
base rows gives, row for row, PEFT's greedy tokens; the base's matrices exist only quantized."""

from __future__ import annotations

import gc
import types
import warnings

import pytest
import torch

pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

from leantune.config import QuantConfig  # noqa: E402
from leantune.models.load import load_model  # noqa: E402
from leantune.quant import is_quantized, spec_of, storage_bits  # noqa: E402
from leantune.serve.batched_lora import BatchedLoraLinear  # noqa: E402
from leantune.serve.engine import Engine, Request, Sampling  # noqa: E402
from tests.unit.test_serve_engine import N, ROWS, SPECS, TEXTS, save_adapters  # noqa: E402  (the same adapters + rows)

CASES = {  # leantune's quant section / transformers' BitsAndBytesConfig for the same base
    "nf4-double": (dict(bits=4, type="nf4", double_quant=True),
                   dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    "fp4": (dict(bits=4, type="fp4", double_quant=False),
            dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False)),
    "int8": (dict(bits=8), dict(load_in_8bit=True)),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_llama_dir):
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return save_adapters(base, tmp_path_factory.mktemp("served-q"))


def ours(folder, quant: dict):
    return load_model(folder, dtype="fp32", device="cpu", quant=QuantConfig(**quant, compute_dtype="fp32")).eval()


def transformers_bnb(folder, bnb: dict):
    cfg = BitsAndBytesConfig(**bnb, **({"bnb_4bit_compute_dtype": torch.float32} if "load_in_4bit" in bnb else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map={"": "cpu"},
                                                    quantization_config=cfg).eval()


def peft_greedy(base, folder, ids, n):
    model = base
    if folder is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(base, str(folder)).eval()
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=3, eos_token_id=None)
    return out[0, len(ids):].tolist()


def run_batch(engine, prompts, adapters, n=N):
    reqs = [engine.submit(Request(p, a, Sampling(max_tokens=n), lambda *_: None)) for p, a in zip(prompts, adapters)]
    while engine.busy():
        engine.step()
    return [r.tokens for r in reqs]


@pytest.mark.parametrize("case", CASES, ids=CASES)
def test_mixed_batch_over_a_quantized_base_equals_peft_over_transformers_bnb(tiny_llama_dir, tiny_tokenizer,
                                                                              folders, case):
    quant, bnb = CASES[case]
    engine = Engine(ours(tiny_llama_dir, quant), tiny_tokenizer, max_loras=4)
    for name, path in folders.items():
        engine.add_adapter(name, path)
    engine.eos = set()
    prompts = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    got = run_batch(engine, prompts, ROWS)
    assert all(is_quantized(m.base_layer) for m in engine.layers.values())
    for ids, adapter, tokens in zip(prompts, ROWS, got):   # a fresh bnb base per adapter, as PEFT users load one
        if case == "int8" and SPECS.get(adapter, (0, 0, {}))[2].get("use_dora"):
            # PEFT 0.21.2's DoRA over a bitsandbytes 0.50 8-bit base fails on its second forward on the CPU
            # (AttributeError inside bnb's int8_mixed_scaled_mm: its dequantize leaves the layer's state without
            # SCB); no live reference, so this row must at least equal the adapter run alone in our engine
            assert tokens == engine.generate(ids, adapter, Sampling(max_tokens=N))["tokens"]
            continue
        reference = transformers_bnb(tiny_llama_dir, bnb)
        assert tokens == peft_greedy(reference, folders.get(adapter), ids, N), f"{case}: row with adapter {adapter}"
    assert got[2] != got[0] and got[5] != got[1]          # base rows read no adapter (vLLM #48421)
    if quant["bits"] == 8:
        return   # LLM.int8 of this tiny model is close enough to fp32 that its greedy tokens are the float ones
    float_engine = Engine(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval(),
                          tiny_tokenizer, max_loras=4)
    for name, path in folders.items():
        float_engine.add_adapter(name, path)
    float_engine.eos = set()
    assert run_batch(float_engine, prompts, ROWS) != got   # the quantized base is what ran, not the float one


def reachable_tensors(root) -> list[torch.Tensor]:
    """Every tensor reachable from `root` through object references (attributes, containers, closures of hooks,
    bitsandbytes' quantization states), not through modules, classes or a function's globals."""
    seen, todo, found = set(), [root], []
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, type, str, bytes, int, float)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
            todo.extend(gc.get_referents(obj.__dict__) if hasattr(obj, "__dict__") else [])
            continue
        if isinstance(obj, types.FunctionType):
            todo.extend([c.cell_contents for c in obj.__closure__ or () if c.cell_contents is not None])
            continue
        todo.extend(gc.get_referents(obj))
    return found


@pytest.mark.parametrize("case", ["nf4-double", "int8"])
def test_the_base_matrices_are_held_quantized_only(tiny_llama_dir, tiny_tokenizer, folders, case):
    quant, _ = CASES[case]
    engine = Engine(ours(tiny_llama_dir, quant), tiny_tokenizer, max_loras=4)
    for name, path in folders.items():
        engine.add_adapter(name, path)
    engine.eos = set()
    run_batch(engine, [tiny_tokenizer(t)["input_ids"] for t in TEXTS], ROWS, n=2)   # every adapter in a slot
    model = engine.model
    layers = [m for m in model.modules() if is_quantized(m)]
    assert len(layers) == 7 * 2 and {id(m.base_layer) for m in engine.layers.values()} <= {id(m) for m in layers}
    held = [t for t in reachable_tensors(engine) if t.device.type != "meta"]
    # no float tensor of a quantized Linear's (out, in) shape anywhere the engine reaches: no 16/32-bit copy of
    # the base's matrices, and no dequantized one cached by DoRA's slot load
    shapes = {(m.out_features, m.in_features) for m in layers}
    assert [tuple(t.shape) for t in held if t.dtype.is_floating_point and tuple(t.shape) in shapes] == []
    # and the bytes add up: float parameters + the quantized layers' storage + the slots + small buffers
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}
    quantized = sum(storage_bits(m)[0] // 8 for m in layers)
    floating = sum(p.numel() * p.element_size() for p in model.parameters() if p.dtype.is_floating_point)
    slots = sum(t.numel() * t.element_size() for m in engine.layers.values()
                for t in (m.A, m.B, *([m.g] if m.g is not None else [])))
    buffers = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if not n.endswith((".A", ".B")))
    cpu_cache = sum(t.numel() * t.element_size() for w in engine.cpu.values() for f in w.factors.values()
                    for t in f if t is not None)     # the adapters as read from disk (--max-cpu-loras)
    expected = floating + quantized + slots + buffers + cpu_cache
    assert expected <= sum(storages.values()) <= expected + 16 * 1024   # + small state: masks, code tables' copies
    full = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    weights = sum(m.weight.numel() for m in full.modules()
                  if isinstance(m, torch.nn.Linear) and m is not full.get_output_embeddings())
    # bits per weight, the per-layer code tables included (1-2 KiB each: a large share of a 64-wide Linear)
    assert quantized * 8 / weights < (6.5 if quant["bits"] == 4 else 9)
    assert spec_of(model).bits == quant["bits"]
    assert isinstance(engine.model.model.layers[0].self_attn.q_proj, BatchedLoraLinear)


def test_an_adapter_loaded_at_run_time_is_told_when_its_run_trained_over_another_base(tiny_llama_dir, tmp_path):
    from leantune.checkpoint.run_folder import RunInfo, write_run_info
    from leantune.serve.adapter_folders import base_mismatch

    sixteen = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    nf4 = load_model(str(tiny_llama_dir), dtype=torch.float32, device="cpu",
                     quant=QuantConfig(bits=4, type="nf4", compute_dtype="fp32"))
    plain, qlora = tmp_path / "plain", tmp_path / "qlora"
    for d, quant in ((plain, None), (qlora, {"bits": 4, "type": "nf4", "double_quant": True})):
        d.mkdir()
        write_run_info(d, RunInfo(method="lora", base_model=str(tiny_llama_dir), dtype="fp32", quant=quant))
    assert base_mismatch(sixteen, plain) is None and base_mismatch(nf4, qlora) is None
    assert base_mismatch(sixteen, tmp_path) is None                       # no sidecar: nothing to compare
    said = base_mismatch(sixteen, qlora)
    assert "trained over a 4-bit nf4 base" in said and "holds a 16-bit base" in said
    assert "trained over a 16-bit base" in base_mismatch(nf4, plain)
