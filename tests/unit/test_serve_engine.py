"""The serving engine (leantune.serve.engine): a mixed batch of 4 adapters (LoRA, rsLoRA, DoRA, ranks 2-8)
and base rows gives, row for row, the tokens each adapter gives alone under PEFT (the live reference) and
under our own `generate`; base rows never pick up an adapter (vLLM #48421); rows that join mid-decode
agree too; adapters beyond max_loras are evicted and read back from disk; refusals are one line."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch

from leantune.errors import ConfigError, ModelError
from leantune.serve.engine import Engine, Request, Sampling

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

SPECS = {  # name: (rank, targets, extra LoraConfig fields)
    "a": (4, ["q_proj", "v_proj"], {}),
    "b": (8, ["v_proj", "up_proj", "o_proj"], {}),
    "c": (2, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], {"use_rslora": True}),
    "d": (4, ["q_proj", "v_proj", "down_proj"], {"use_dora": True}),
}
TEXTS = ["the quick brown fox", "one two three four five six", "a journey", "write a haiku about the sea",
         "what is", "instruction input"]
ROWS = ["a", "b", None, "c", "d", None]
N = 10


@pytest.fixture(scope="module")
def base(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, base):
    return save_adapters(base, tmp_path_factory.mktemp("served"))


def save_adapters(base, d):
    """SPECS saved with PEFT under `d`, their factors random (B = 0 at init would make every adapter the base)."""
    for i, (name, (r, targets, extra)) in enumerate(SPECS.items()):
        torch.manual_seed(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = get_peft_model(copy.deepcopy(base), LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **extra))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
                if "magnitude" in n:
                    p.mul_(1.5)
        m.save_pretrained(d / name)
    return {n: d / n for n in SPECS}


def _engine(base, tok, folders, **kw):
    engine = Engine(copy.deepcopy(base), tok, **kw)
    for name, path in folders.items():
        engine.add_adapter(name, path)
    return engine


def _peft_greedy(base, folder, ids, n):
    model = base
    if folder is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder))
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, pad_token_id=3, eos_token_id=None)
    return out[0, len(ids):].tolist()


def _run_batch(engine, prompts, adapters, n=N, join_late=()):
    reqs = [Request(p, a, Sampling(max_tokens=n), lambda *_: None) for p, a in zip(prompts, adapters)]
    for i, r in enumerate(reqs):
        if i not in join_late:
            engine.submit(r)
    engine.step()
    engine.step()
    for i in join_late:      # these join a batch that is already decoding
        engine.submit(reqs[i])
    while engine.busy():
        engine.step()
    return [r.tokens for r in reqs]


def test_mixed_batch_rows_equal_each_adapter_alone_under_peft(base, tiny_tokenizer, folders):
    engine = _engine(base, tiny_tokenizer, folders, max_loras=4)
    engine.eos = set()    # run every row the full N tokens
    prompts = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    got = _run_batch(engine, prompts, ROWS)
    for ids, adapter, tokens in zip(prompts, ROWS, got):
        assert tokens == _peft_greedy(base, folders.get(adapter), ids, N), f"row with adapter {adapter}"
    # and base rows of the batch are not all equal to some adapter's output (the #48421 bug shape)
    assert got[2] != got[0] and got[5] != got[1]


def test_rows_joining_mid_decode_agree_with_a_batch_run_alone(base, tiny_tokenizer, folders):
    engine = _engine(base, tiny_tokenizer, folders, max_loras=4)
    engine.eos = set()
    prompts = [tiny_tokenizer(t)["input_ids"] for t in TEXTS]
    together = _run_batch(engine, prompts, ROWS)
    staggered = _run_batch(engine, prompts, ROWS, join_late=(1, 3, 5))
    assert staggered == together
    assert engine.kv.cache is None and not engine.running     # every row left and freed its KV


def test_engine_generate_matches_leantune_generate(base, tiny_tokenizer, folders):
    from leantune.infer.generate import generate_text

    engine = _engine(base, tiny_tokenizer, {"a": folders["a"]}, max_loras=1)
    messages = [{"role": "user", "content": "the capital of france"}]
    from leantune.infer.generate import build_prompt

    ours = engine.generate(build_prompt(tiny_tokenizer, messages, raw=False), "a", Sampling(max_tokens=8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from leantune.checkpoint.adapter_io import load_adapter

        single = copy.deepcopy(base)
        load_adapter(single, folders["a"])
    assert ours["text"].strip() == generate_text(single, tiny_tokenizer, messages, max_new_tokens=8)
    assert ours["completion_tokens"] == len(ours["tokens"]) <= 8


def test_lru_eviction_and_reload_from_disk(base, tiny_tokenizer, folders):
    engine = _engine(base, tiny_tokenizer, folders, max_loras=2, max_cpu_loras=2)
    engine.eos = set()
    ids = tiny_tokenizer("the quick brown fox")["input_ids"]
    first = {n: engine.generate(ids, n, Sampling(max_tokens=6))["tokens"] for n in ("a", "b", "c", "d")}
    assert len(engine.resident()) == 2 and set(engine.resident()) == {"c", "d"}   # a, b evicted (LRU)
    loads = engine.loads
    again = engine.generate(ids, "a", Sampling(max_tokens=6))["tokens"]
    assert engine.loads == loads + 1            # a left the CPU cache too: read from disk again
    assert again == first["a"] == _peft_greedy(base, folders["a"], ids, 6)
    assert "a" in engine.resident() and "d" in engine.resident()   # c was the least recently used


def test_a_full_slot_set_makes_requests_wait_not_fail(base, tiny_tokenizer, folders):
    engine = _engine(base, tiny_tokenizer, folders, max_loras=2)
    engine.eos = set()
    prompts = [tiny_tokenizer(t)["input_ids"] for t in TEXTS[:4]]
    got = _run_batch(engine, prompts, ["a", "b", "c", "d"], n=4)
    for ids, name, tokens in zip(prompts, "abcd", got):
        assert tokens == _peft_greedy(base, folders[name], ids, 4)


def test_seeded_sampling_is_deterministic_and_stop_strings_cut(base, tiny_tokenizer, folders):
    engine = _engine(base, tiny_tokenizer, folders, max_loras=4)
    ids = tiny_tokenizer("the quick brown fox")["input_ids"]
    s = Sampling(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    one, two = engine.generate(ids, "b", s), engine.generate(ids, "b", s)
    assert one["tokens"] == two["tokens"]
    assert engine.generate(ids, "b", Sampling(max_tokens=12, temperature=1.0, seed=8))["tokens"] != one["tokens"]
    full = engine.generate(ids, None, Sampling(max_tokens=12))["text"]
    cut = full[len(full) // 2: len(full) // 2 + 2]
    stopped = engine.generate(ids, None, Sampling(max_tokens=12, stop=[cut]))
    assert stopped["finish_reason"] == "stop" and stopped["text"] == full[:full.find(cut)]


def test_cancelled_request_frees_its_row(base, tiny_tokenizer, folders):
    engine = _engine(base, tiny_tokenizer, folders, max_loras=4)
    engine.eos = set()
    r = engine.submit(Request(tiny_tokenizer("a journey")["input_ids"], "a", Sampling(max_tokens=50), lambda *_: None))
    engine.step()
    assert engine.running == [r]
    r.cancel()
    engine.step()
    assert engine.running == [] and engine.kv.cache is None and len(r.tokens) < 50


def test_refusals_are_one_line(base, tiny_tokenizer, folders, tmp_path):
    engine = _engine(base, tiny_tokenizer, {}, max_loras=2)
    ia3 = tmp_path / "ia3"
    ia3.mkdir()
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3", "target_modules": ["k_proj"]}))
    with pytest.raises(ModelError, match="IA3 .*leantune merge"):
        engine.add_adapter("ia3", ia3)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    with pytest.raises((ModelError, ConfigError)):
        engine.add_adapter("broken", broken)
    with pytest.raises(ConfigError, match="not allowed"):
        engine.add_adapter("../x", folders["a"])
    with pytest.raises(ConfigError, match="no adapter named"):
        engine.submit(Request([1, 2], "nope", Sampling(), lambda *_: None))
    engine.add_adapter("a", folders["a"])
    assert list(engine.adapters) == ["a"]    # the failures left nothing behind


def test_base_rows_read_no_slot_not_even_the_last_one():
    """The vLLM #48421 shape at the layer: slot -1 must not wrap to the last slot."""
    from leantune.serve.batched_lora import BatchContext, BatchedLoraLinear

    torch.manual_seed(0)
    ctx = BatchContext()
    layer = BatchedLoraLinear(torch.nn.Linear(16, 8, bias=True), slots=3, ctx=ctx)
    for slot in range(3):
        layer.put(slot, torch.randn(4, 16), torch.randn(8, 4), scaling=2.0)
    x = torch.randn(5, 2, 16)
    ctx.set([-1, 2, -1, 0, 2], x.device)
    y = layer(x)
    plain = layer.base_layer(x)
    torch.testing.assert_close(y[[0, 2]], plain[[0, 2]], rtol=0, atol=0)
    for row, slot in [(1, 2), (3, 0), (4, 2)]:
        want = plain[row] + 2.0 * (x[row] @ layer.A[slot].t()) @ (layer.B[slot] / 2.0)
        torch.testing.assert_close(y[row], want, rtol=1e-5, atol=1e-5)
