"""GGUF export against live references: transformers' GGUF loader (logits of F32 / Q8_0 / Q4_K_M files),
gguf's reader (metadata keys and tensor names of a real llama.cpp-made file, the SmolLM2 demo GGUF),
and llama.cpp's convention for LoRA scale (alpha / r) applied to our adapter file.

llama-cpp-python is not installed by default (a 15-minute compile); when it is, the last test loads our
file in llama.cpp itself. The prebuilt llama.cpp (npm) checks are in test_gguf_llamacpp.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from leantune.adapters.lora import inject_lora  # noqa: E402
from leantune.export.gguf.writer import architecture, write_gguf  # noqa: E402
from leantune.export.gguf.lora import write_lora_gguf  # noqa: E402
from leantune.export.gguf.quant_mix import tensor_type, use_more_bits  # noqa: E402

TEXT = "the quick brown fox jumps over the lazy dog. what is the capital of france?"


def _logits(model, tok):
    ids = torch.tensor([tok(TEXT)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits[0]


def _load_back(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def deep_wide_llama_dir(tmp_path_factory):
    """conftest's wide Llama (hidden 256: rows a multiple of 256, so k-quants apply; untied output) at 8 layers."""
    from tests.conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("wide-llama"), hidden=256, layers=8)


@pytest.mark.parametrize("quant, tol", [("F32", 1e-5), ("Q8_0", 0.05), ("Q4_K_M", 0.3)])
def test_gguf_loads_in_transformers_with_matching_logits(deep_wide_llama_dir, tmp_path, quant, tol):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(deep_wide_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(deep_wide_llama_dir)
    path = tmp_path / f"m-{quant}.gguf"
    write_gguf(model, tok, deep_wide_llama_dir, path, quant, progress=False)
    ref, got = _logits(model, tok), _logits(_load_back(path), tok)
    rel = (got - ref).abs().max() / ref.abs().max()
    assert rel <= tol, (quant, float(rel))
    if quant == "F32":
        back_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        assert back_tok(TEXT)["input_ids"] == tok(TEXT)["input_ids"]


def test_q4_k_m_uses_llama_quantize_tensor_mix(deep_wide_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(deep_wide_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(deep_wide_llama_dir)
    path = tmp_path / "mix.gguf"
    write_gguf(model, tok, deep_wide_llama_dir, path, "Q4_K_M", progress=False)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    n = 8
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    for i in range(n):
        more = "Q6_K" if use_more_bits(i, n) else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == more and types[f"blk.{i}.ffn_down.weight"] == more
        assert types[f"blk.{i}.attn_q.weight"] == "Q4_K" and types[f"blk.{i}.ffn_up.weight"] == "Q4_K"


def test_rows_not_a_multiple_of_256_fall_back_like_llama_quantize():
    # SmolLM2's hidden 576: llama-quantize writes Q5_0 for Q4_K, Q8_0 for Q6_K and the tied embeddings.
    assert tensor_type("blk.3.attn_q.weight", (576, 576), "Q4_K_M", 30, True).name == "Q5_0"
    assert tensor_type("blk.0.attn_v.weight", (192, 576), "Q4_K_M", 30, True).name == "Q8_0"
    assert tensor_type("blk.3.ffn_down.weight", (576, 1536), "Q4_K_M", 30, True).name == "Q4_K"
    assert tensor_type("token_embd.weight", (49152, 576), "Q4_K_M", 30, True).name == "Q8_0"
    assert tensor_type("blk.3.attn_q.weight", (576, 576), "Q5_K_M", 30, True).name == "Q5_1"


def _fields(path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}, [t.name for t in r.tensors]


@pytest.mark.slow  # loads the real 49k-token tokenizer and a 2-layer cut of SmolLM2: ~1-4 min on 2 busy cores
def test_metadata_and_tensor_names_match_a_llama_cpp_made_file(tmp_path):
    """Export a 2-layer cut of the real SmolLM2 and compare keys and names with the file llama.cpp made."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leantune.models.demo_model import cut_layers, demo_model_dir, smollm2_gguf_path

    cut = cut_layers(demo_model_dir(), 2, tmp_path / "cut")
    model = AutoModelForCausalLM.from_pretrained(cut, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(cut)
    path = tmp_path / "smol.gguf"
    write_gguf(model, tok, cut, path, "Q8_0", progress=False)
    ours, our_names = _fields(path)
    theirs, their_names = _fields(smollm2_gguf_path())
    needed = {k for k in theirs if k.startswith(("llama.", "tokenizer.")) or k in
              ("general.architecture", "general.file_type", "general.quantization_version", "general.name")}
    assert needed <= set(ours), needed - set(ours)
    for key in ("llama.embedding_length", "llama.feed_forward_length", "llama.attention.head_count",
                "llama.attention.head_count_kv", "llama.rope.dimension_count", "llama.rope.freq_base",
                "llama.vocab_size", "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_space_prefix",
                "tokenizer.chat_template"):
        assert ours[key].contents() == theirs[key].contents(), key
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert ours[key].contents() == theirs[key].contents(), key
    assert set(our_names) == {n for n in their_names if not n.startswith("blk.") or n.split(".")[1] in ("0", "1")}
    # the q/k permutation: transformers' loader (which reverses llama.cpp's) gives back our weights
    back = _load_back(path)
    q = model.model.layers[1].self_attn.q_proj.weight
    assert torch.allclose(back.model.layers[1].self_attn.q_proj.weight, q, atol=float(q.abs().max()) / 100)


def test_unsupported_architecture_fails_before_loading(tmp_path):
    from leantune.errors import ModelError

    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ModelError, match="GGUF export supports"):
        architecture(tmp_path)


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_gguf_applied_the_llama_cpp_way_equals_our_merged_export(tiny_llama, tiny_llama_dir, tmp_path, rslora):
    """llama.cpp computes W + (alpha / r) * B @ A from the file's alpha and the tensors' rank. With our
    alpha' (rsLoRA: alpha * sqrt(r)) and B's RoPE row permutation, that equals the weight of our merged
    F32 export (itself checked against transformers above), attn_q included."""
    from transformers import AutoTokenizer

    from leantune.adapters.base import unload

    rank, tok = 4, AutoTokenizer.from_pretrained(tiny_llama_dir)
    base_path, lora_path, merged_path = tmp_path / "base.gguf", tmp_path / "lora.gguf", tmp_path / "merged.gguf"
    write_gguf(tiny_llama, tok, tiny_llama_dir, base_path, "F32", progress=False)
    inject_lora(tiny_llama, rank=rank, alpha=8, targets=["q_proj", "v_proj"], rslora=rslora)
    torch.manual_seed(1)
    for name, p in tiny_llama.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.05)
    write_lora_gguf(tiny_llama, "llama", lora_path, "test")
    unload(tiny_llama, merge=True)
    write_gguf(tiny_llama, tok, tiny_llama_dir, merged_path, "F32", progress=False)

    r = gguf.GGUFReader(lora_path)
    alpha = float(r.fields["adapter.lora.alpha"].contents())
    assert r.fields["general.type"].contents() == "adapter" and r.fields["adapter.type"].contents() == "lora"
    assert math.isclose(alpha, 8 * (math.sqrt(rank) if rslora else 1), rel_tol=1e-6)
    lora = {t.name: np.array(t.data) for t in r.tensors}
    base = {t.name: np.array(t.data) for t in gguf.GGUFReader(base_path).tensors}
    merged = {t.name: np.array(t.data) for t in gguf.GGUFReader(merged_path).tensors}
    for name in ("blk.0.attn_q.weight", "blk.1.attn_q.weight", "blk.1.attn_v.weight"):
        a, b = lora[f"{name}.lora_a"], lora[f"{name}.lora_b"]
        assert a.shape[0] == rank and b.shape[1] == rank
        applied = base[name] + (alpha / a.shape[0]) * (b @ a)
        assert not np.allclose(base[name], merged[name])
        np.testing.assert_allclose(applied, merged[name], atol=1e-5)


def test_llama_cpp_reads_our_file_when_installed(deep_wide_llama_dir, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(deep_wide_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(deep_wide_llama_dir)
    path = tmp_path / "m.gguf"
    write_gguf(model, tok, deep_wide_llama_dir, path, "F32", progress=False)
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, verbose=False, n_ctx=128)
    ids = tok(TEXT)["input_ids"]
    llm.eval(ids)
    got = np.array(llm.scores[: len(ids)])
    np.testing.assert_allclose(got, _logits(model, tok).numpy(), atol=1e-3 * float(np.abs(got).max()))
