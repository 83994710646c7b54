"""GGUF for architectures beyond Llama/Mistral/Qwen2, checked against llama.cpp's own converter
(convert_hf_to_gguf.py) and tensor table (gguf.constants.MODEL_TENSORS): key names and values, tensor
names; the files are loaded by llama.cpp in test_gguf_llamacpp.py.

Qwen3: arch "qwen3"; {arch}.attention.key_length / value_length = head_dim whenever config.json has
head_dim (the converter's TextModel rule); q_norm / k_norm -> blk.N.attn_q_norm / attn_k_norm; no q/k
row permutation (NEOX RoPE); tokenizer pre "qwen2".
"""

from __future__ import annotations

import pytest
import torch

gguf = pytest.importorskip("gguf")

from leantune.export.gguf.writer import architecture, write_gguf  # noqa: E402


def _random_norms_saved(model, folder) -> None:
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)  # the default ones would hide a misnamed or misapplied norm
    model.save_pretrained(folder)


def tiny_qwen3(folder):
    """A 2-layer random Qwen3 (hidden 256, 4 heads of 64: head_dim != hidden / heads) with non-trivial
    q/k norms, saved with a byte-level BPE tokenizer."""
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from tests.conftest import build_tokenizer

    build_tokenizer().save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=512,
                      tie_word_embeddings=True, rope_theta=1e6)
    model = Qwen3ForCausalLM(cfg).eval()
    _random_norms_saved(model, folder)
    return folder, model, tok


def test_qwen3_metadata_and_tensors_follow_the_converter(tmp_path):
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    folder, model, tok = tiny_qwen3(tmp_path)
    assert architecture(folder) == "qwen3"
    path = tmp_path / "q3.gguf"
    write_gguf(model, tok, folder, path, "F32", progress=False)
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items()}
    assert f["general.architecture"] == "qwen3" and f["tokenizer.ggml.pre"] == "qwen2"
    want = {"qwen3.embedding_length": 256, "qwen3.block_count": 2, "qwen3.feed_forward_length": 512,
            "qwen3.attention.head_count": 4, "qwen3.attention.head_count_kv": 2, "qwen3.attention.key_length": 64,
            "qwen3.attention.value_length": 64, "qwen3.rope.freq_base": 1e6, "qwen3.context_length": 512}
    assert {k: f[k] for k in want} == want
    allowed = {TENSOR_NAMES[t].format(bid=i) + ".weight" for t in MODEL_TENSORS[MODEL_ARCH.QWEN3] for i in range(2)}
    names = {t.name for t in r.tensors}
    assert names <= allowed and {"blk.1.attn_q_norm.weight", "blk.1.attn_k_norm.weight"} <= names
    # transformers 5.24's GGUF reader builds Qwen3's k_proj with the wrong shape from these (llama.cpp's) keys, so
    # the load-back check for Qwen3 is llama.cpp itself: test_gguf_llamacpp.py::test_qwen3_runs_in_llama_cpp


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}  # a short original context, so a short text is scaled


def tiny_llama_rope(folder, rope: dict):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tests.conftest import build_tokenizer

    build_tokenizer().save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rope_scaling=rope)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    return folder, model, tok


def _converter_llama3_factors(head_dim: int, base: float, p: dict) -> list[float]:
    """convert_hf_to_gguf.py's LlamaModel rope_freqs, written out from its loop."""
    import math

    low_wavelen = p["original_max_position_embeddings"] / p["low_freq_factor"]
    high_wavelen = p["original_max_position_embeddings"] / p["high_freq_factor"]
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi / (1.0 / base ** (i / head_dim))
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(p["factor"])
        else:
            smooth = (p["original_max_position_embeddings"] / wavelen - p["low_freq_factor"]) / (
                p["high_freq_factor"] - p["low_freq_factor"])
            out.append(1 / ((1 - smooth) / p["factor"] + smooth))
    return out


def test_llama3_rope_scaling_writes_the_converters_rope_freqs(tmp_path):
    import numpy as np

    folder, model, tok = tiny_llama_rope(tmp_path, LLAMA3_ROPE)
    path = tmp_path / "l3.gguf"
    write_gguf(model, tok, folder, path, "Q8_0", progress=False)
    r = gguf.GGUFReader(path)
    freqs = {t.name: t for t in r.tensors}["rope_freqs.weight"]
    assert freqs.tensor_type.name == "F32"
    want = _converter_llama3_factors(64, 10000.0, LLAMA3_ROPE)
    assert len(set(want)) > 2  # some frequencies kept, some divided by 8, some smoothed
    np.testing.assert_allclose(np.array(freqs.data), want, rtol=1e-5)
    assert "llama.rope.scaling.type" not in r.fields  # the converter writes no scaling keys for llama3


def test_linear_rope_scaling_writes_type_and_factor(tmp_path):
    folder, model, tok = tiny_llama_rope(tmp_path, {"rope_type": "linear", "factor": 4.0})
    path = tmp_path / "lin.gguf"
    write_gguf(model, tok, folder, path, "F16", progress=False)
    f = {k: v.contents() for k, v in gguf.GGUFReader(path).fields.items()}
    assert f["llama.rope.scaling.type"] == "linear" and f["llama.rope.scaling.factor"] == 4.0


def test_unsupported_rope_scaling_is_refused_before_writing(tmp_path):
    from leantune.errors import ModelError

    folder, model, tok = tiny_llama_rope(tmp_path, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ModelError, match="RoPE scaling 'dynamic' is not exported yet"):
        write_gguf(model, tok, folder, tmp_path / "x.gguf", "F16", progress=False)
    assert not (tmp_path / "x.gguf").exists()


def tiny_phi3(folder):
    """A 2-layer random Phi-3 (fused qkv_proj and gate_up_proj) with non-trivial norms."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    from tests.conftest import build_tokenizer

    build_tokenizer().save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    cfg = Phi3Config(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                     original_max_position_embeddings=512, bos_token_id=1, eos_token_id=5, pad_token_id=3)
    model = Phi3ForCausalLM(cfg).eval()
    _random_norms_saved(model, folder)
    return folder, model, tok


def test_phi3_metadata_tensors_and_mix_follow_llama_cpp(tmp_path):
    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    from leantune.export.gguf.quant_mix import tensor_type, use_more_bits

    folder, model, tok = tiny_phi3(tmp_path)
    assert architecture(folder) == "phi3"
    path = tmp_path / "p3.gguf"
    write_gguf(model, tok, folder, path, "F32", progress=False)
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items()}
    want = {"phi3.embedding_length": 256, "phi3.block_count": 2, "phi3.feed_forward_length": 512,
            "phi3.attention.head_count": 4, "phi3.attention.head_count_kv": 4, "phi3.rope.dimension_count": 64,
            "phi3.rope.scaling.original_context_length": 512, "phi3.context_length": 512}
    assert {k: f[k] for k in want} == want
    allowed = {TENSOR_NAMES[t].format(bid=i) + ".weight" for t in MODEL_TENSORS[MODEL_ARCH.PHI3] for i in range(2)}
    names = {t.name for t in r.tensors}
    assert names <= allowed and {"blk.0.attn_qkv.weight", "blk.0.ffn_up.weight"} <= names
    shapes = {t.name: tuple(int(s) for s in reversed(t.shape)) for t in r.tensors}
    assert shapes["blk.0.attn_qkv.weight"] == (3 * 256, 256) and shapes["blk.0.ffn_up.weight"] == (2 * 512, 256)
    # llama-quantize puts fused qkv in the attn_v category
    for i in range(8):
        more = "Q6_K" if use_more_bits(i, 8) else "Q4_K"
        assert tensor_type(f"blk.{i}.attn_qkv.weight", (768, 256), "Q4_K_M", 8, False).name == more
    assert tensor_type("blk.0.attn_qkv.weight", (768, 256), "Q3_K_M", 8, False).name == "Q5_K"
