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
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)  # the default ones would hide a misnamed or misapplied norm
    model.save_pretrained(folder)
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
