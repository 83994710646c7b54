"""AWQ: on a real decoder layer the activation-aware scales (and the clip search) give a smaller layer-output
error than plain asymmetric round-to-nearest, the folding leaves the float layer's function unchanged, and
options AWQ cannot hold are refused in one line. Calibration: deterministic, from the run's own data."""

from __future__ import annotations

import copy

import pytest
import torch

from leantune.export import wna16
from leantune.export.awq import search_scale, solve
from leantune.export.calibration import LayerWalk, calibration_rows
from leantune.quant import wna16 as math


@pytest.fixture
def walk(tiny_llama):
    torch.manual_seed(0)
    return LayerWalk(tiny_llama, torch.randint(0, tiny_llama.config.vocab_size, (8, 64)))


def layer_error(layer, reference, walk) -> float:
    return sum(float((a - b).pow(2).mean()) for a, b in zip(walk.run(layer), reference))


def test_awq_beats_round_to_nearest_on_a_decoder_layers_output(tiny_llama, walk):
    spec = wna16.Spec("awq", bits=4, group_size=32, sym=False)
    layer = tiny_llama.model.layers[0]
    with torch.no_grad():             # a few loud input channels, as trained LLMs have (random init has none)
        layer.input_layernorm.weight[:4] *= 10
        layer.post_attention_layernorm.weight[:4] *= 10
    reference = walk.run(layer)
    rtn = copy.deepcopy(layer)
    for m in rtn.modules():
        if isinstance(m, torch.nn.Linear):
            wna16.set_weight(m, wna16.packed_of(*math.rtn(m.weight, 4, 32, sym=False)))
    awq, awq_clipped = copy.deepcopy(layer), copy.deepcopy(layer)
    solve(awq, walk, spec, clip=False)
    solve(awq_clipped, walk, spec, clip=True)
    e_rtn, e_awq, e_clip = (layer_error(m, reference, walk) for m in (rtn, awq, awq_clipped))
    assert e_awq < 0.8 * e_rtn
    assert e_clip < 0.8 * e_rtn


def test_the_scale_search_never_loses_to_round_to_nearest_on_its_objective():
    torch.manual_seed(0)
    x = torch.randn(300, 64) * torch.linspace(0.1, 6, 64)          # a few loud channels, as activations have
    w = torch.randn(48, 64)
    spec = wna16.Spec("awq", bits=4, group_size=32, sym=False)

    def err(s):
        codes, scale, zero = math.rtn(w * s, 4, 32, sym=False)
        return float((x @ (math.dequantize(codes, scale, zero) / s).T - x @ w.T).pow(2).mean())

    s = search_scale(x, [w], spec)
    assert err(s) < err(torch.ones(64))


def test_folding_the_scales_keeps_the_float_layer(tiny_llama, walk):
    """Quantization aside (8-bit, where rounding is tiny), the scaled layer computes what the original did."""
    spec = wna16.Spec("awq", bits=8, group_size=32, sym=False)
    layer = tiny_llama.model.layers[0]
    reference = walk.run(layer)
    work = copy.deepcopy(layer)
    solve(work, walk, spec, clip=False)
    assert not torch.equal(work.input_layernorm.weight, layer.input_layernorm.weight)   # scales were folded in
    rel = max(float((a - b).norm() / b.norm()) for a, b in zip(walk.run(work), reference))
    assert rel < 2e-2


@pytest.mark.parametrize("extra,message", [
    (["--act-order"], "--act-order is a GPTQ option; drop it for --format awq"),
    (["--bits", "8"], "the AWQ GEMM layout holds 4-bit weights only"),
])
def test_what_awq_cannot_hold_is_refused_in_one_line(tiny_llama_dir, tmp_path, capsys, extra, message):
    from leantune.cli.main import main
    from tests.conftest import CORPUS

    calib = tmp_path / "c.txt"
    calib.write_text("\n".join(CORPUS[:10]))
    out = tmp_path / "out"
    rc = main(["export", str(tiny_llama_dir), "--format", "awq", "--out", str(out), "--calibration", str(calib),
               "--quiet", "--no-eval", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and message in err[-1]
    assert not out.exists()


def test_calibration_defaults_to_the_runs_training_data_deterministically(tiny_llama_dir, tmp_path):
    import json

    from transformers import AutoTokenizer

    from leantune.errors import DataError

    data = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"question {i} about the sea"},
                          {"role": "assistant", "content": f"answer {i}: waves fold into foam"}]} for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"model: {tiny_llama_dir}\ndata:\n  path: {data}\n")
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    a = calibration_rows(tok, file=None, source=str(run), samples=4, seq=16)
    b = calibration_rows(tok, file=None, source=str(run), samples=4, seq=16)
    assert a.rows.shape == (4, 16) and torch.equal(a.rows, b.rows)
    assert "training data" in a.describe() and a.describe().startswith("4 x 16 tokens")
    first = tok.apply_chat_template(rows[0]["messages"], tokenize=False)
    assert tok.decode(a.rows[0]).startswith(first[:20])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="is empty"):
        calibration_rows(tok, file=str(empty), source=None)
