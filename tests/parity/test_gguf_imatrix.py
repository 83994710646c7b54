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


@pytest.fixture
def run_dir(wide, tmp_path):
    folder, _, _ = wide
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{t} ({i})"},
                                                     {"role": "assistant", "content": t[::-1]}]}) + "\n"
                            for i in range(20) for t in TEXTS))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"model: {folder}\ndata:\n  path: {data}\n")
    return run


def _export(wide, out, quant, extra):
    from leantune.export.base import ExportOptions
    from leantune.export.gguf import GGUFExporter

    folder, model, tok = wide
    part = GGUFExporter().write(model, tok, None, folder, out, quant, ExportOptions(extra=extra, progress=False))
    return part, {t.name: t.data.tobytes() for t in gguf.GGUFReader(out).tensors}


def test_low_bit_k_quants_of_a_run_default_to_its_training_data(wide, run_dir, tmp_path, capsys):
    from leantune.export.calibration import calibration_rows

    folder, model, tok = wide
    part, got = _export(wide, tmp_path / "a.gguf", "Q3_K_M", {"source": str(run_dir), "calibration_samples": 4,
                                                              "calibration_seq": 32})
    assert part["imatrix"].startswith("4 x 32 tokens from the run's training data")
    assert "imatrix: " in capsys.readouterr().err
    # the same file as an explicit matrix over export/calibration.py's rows of the run
    rows = calibration_rows(tok, file=None, source=str(run_dir), samples=4, seq=32).rows
    matrix, tokens = imatrix.collect_rows(model, rows)
    assert tokens == 4 * 32
    write_gguf(model, tok, folder, tmp_path / "b.gguf", "Q3_K_M", progress=False, imatrix=matrix)
    want = {t.name: t.data.tobytes() for t in gguf.GGUFReader(tmp_path / "b.gguf").tensors}
    assert got == want
    write_gguf(model, tok, folder, tmp_path / "c.gguf", "Q3_K_M", progress=False)
    plain = {t.name: t.data.tobytes() for t in gguf.GGUFReader(tmp_path / "c.gguf").tensors}
    assert got["blk.0.ffn_down.weight"] != plain["blk.0.ffn_down.weight"]  # the matrix was used


@pytest.mark.parametrize("quant, extra", [("Q5_K_M", {}), ("Q4_K_M", {"imatrix": "none"}),
                                          ("Q8_0", {"imatrix": "NONE"})])
def test_no_default_imatrix_above_4_bits_or_with_none(wide, run_dir, tmp_path, quant, extra):
    part, _ = _export(wide, tmp_path / "x.gguf", quant, {"source": str(run_dir), **extra})
    assert part["imatrix"] is None


def test_a_plain_model_folder_has_no_data_to_calibrate_on_said_once(wide, tmp_path, capsys):
    folder, _, _ = wide
    part, _ = _export(wide, tmp_path / "x.gguf", "Q4_K_M", {"source": str(folder)})
    assert part["imatrix"] is None
    err = capsys.readouterr().err
    assert err.count("imatrix: none") == 1 and "--imatrix DATA" in err


def test_a_run_whose_data_is_gone_exports_without_imatrix_and_says_why(wide, run_dir, tmp_path, capsys):
    (tmp_path / "train.jsonl").unlink()
    part, _ = _export(wide, tmp_path / "x.gguf", "Q4_K_M", {"source": str(run_dir)})
    assert part["imatrix"] is None
    err = capsys.readouterr().err
    assert err.count("imatrix: none (the run's training data could not be read") == 1
