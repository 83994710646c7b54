"""--imatrix: the per-column mean x^2 of each Linear's input over calibration text (llama-imatrix's
statistic), and its effect on a whole GGUF export: the error that matters on that data (each column's
rounding error weighed by its mean squared input) drops against the export without it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from leantune.export.gguf import imatrix  # noqa: E402
from leantune.export.gguf.writer import write_gguf  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog", "what is the capital of france? paris, on the seine.",
         "to make tea, warm the pot and let the leaves steep for three minutes"]


@pytest.fixture(scope="module")
def wide(wide_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = wide_llama_dir
    return d, AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(d)


def test_collect_is_the_mean_squared_input_of_each_linear(wide):
    _, model, tok = wide
    matrix, tokens = imatrix.collect(model, tok, TEXTS)
    assert tokens == sum(len(tok(t)["input_ids"]) for t in TEXTS)
    assert {"blk.0.attn_q.weight", "blk.1.ffn_down.weight", "output.weight"} <= set(matrix)
    # layer 0's attention input, computed by hand: RMSNorm of the embeddings
    with torch.no_grad():
        xs = [model.model.layers[0].input_layernorm(model.model.embed_tokens(tok(t, return_tensors="pt")["input_ids"]))
              for t in TEXTS]
    want = torch.cat([x[0] for x in xs]).square().mean(0).numpy()
    np.testing.assert_allclose(matrix["blk.0.attn_q.weight"], want, rtol=1e-5)
    np.testing.assert_array_equal(matrix["blk.0.attn_q.weight"], matrix["blk.0.attn_k.weight"])
    assert matrix["blk.1.ffn_down.weight"].shape == (model.config.intermediate_size,)
    again, _ = imatrix.collect(model, tok, TEXTS)
    assert all(np.array_equal(matrix[k], again[k]) for k in matrix)  # deterministic


def test_calibration_texts_render_chat_records_with_the_template(wide, tmp_path):
    _, _, tok = wide
    path = tmp_path / "cal.jsonl"
    path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}"},
                                                       {"role": "assistant", "content": f"answer {i}"}]})
                              for i in range(5)))
    texts = imatrix.calibration_texts(path, tok, max_texts=3)
    assert len(texts) == 3 and "<|im_start|>user\nquestion 0" in texts[0] and "answer 0" in texts[0]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    from leantune.errors import DataError
    with pytest.raises(DataError):
        imatrix.calibration_texts(empty, tok)


def _weighted_errors(path, model, matrix) -> dict[str, float]:
    from leantune.export.gguf.quant_mix import K_TYPES
    from leantune.export.gguf.writer import gguf_tensors

    src = dict(gguf_tensors(model, "llama"))
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        if t.tensor_type in K_TYPES and t.name in matrix:
            back = gguf.quants.dequantize(t.data, t.tensor_type).reshape(src[t.name].shape)
            out[t.name] = float(((back - src[t.name]) ** 2 * matrix[t.name]).sum())
    return out


@pytest.mark.parametrize("quant", ["Q4_K_M", "Q3_K_M"])
def test_imatrix_export_lowers_the_error_weighted_by_the_data(wide, tmp_path, quant):
    folder, model, tok = wide
    # skewed activations, as real models have: a few input channels carry most of the energy
    matrix, _ = imatrix.collect(model, tok, TEXTS)
    rng = np.random.default_rng(0)
    matrix = {k: v * np.where(rng.random(v.shape) < 0.05, 100.0, 1.0).astype(np.float32) for k, v in matrix.items()}
    plain, weighted = tmp_path / "plain.gguf", tmp_path / "weighted.gguf"
    write_gguf(model, tok, folder, plain, quant, progress=False)
    write_gguf(model, tok, folder, weighted, quant, progress=False, imatrix=matrix)
    e_plain, e_weighted = _weighted_errors(plain, model, matrix), _weighted_errors(weighted, model, matrix)
    assert e_plain.keys() == e_weighted.keys() and len(e_plain) >= 10
    better = [k for k in e_plain if e_weighted[k] < e_plain[k]]
    assert len(better) == len(e_plain), sorted(set(e_plain) - set(better))
    assert sum(e_weighted.values()) < 0.8 * sum(e_plain.values())


def test_imatrix_with_a_type_that_has_no_k_quants_is_refused(wide, tmp_path):
    from leantune.errors import ConfigError
    from leantune.export.base import ExportOptions
    from leantune.export.gguf import GGUFExporter

    folder, model, tok = wide
    with pytest.raises(ConfigError, match="--imatrix weights the k-quants"):
        GGUFExporter().write(model, tok, None, folder, tmp_path / "x.gguf", "Q8_0",
                             ExportOptions(extra={"imatrix": str(tmp_path / "cal.jsonl")}))
    assert not (tmp_path / "x.gguf").exists()
