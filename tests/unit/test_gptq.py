"""GPTQ: the blocked solver equals the paper's algorithm written plainly here (one column at a time, no
blocks), beats round-to-nearest on a real layer's output with the same calibration, and the export refuses
bad input in one line with nothing written."""

from __future__ import annotations

import json

import pytest
import torch

from leantune.quant import wna16


def reference_gptq(w, h, bits, group_size, damp=0.01, act_order=False):
    """Frantar et al. 2022, Algorithm 1, unblocked: quantize column i, push its error, scaled by the
    inverse Hessian's Cholesky factor, onto every later column. Symmetric grid, per group of columns."""
    w = w.double().clone()
    h = h.double().clone()
    n = w.shape[1]
    gs = n if group_size == -1 else group_size
    maxq = 2 ** bits - 1

    def grid(cols):                                    # (scale, zero) per row, GPTQ's symmetric grid
        amax = torch.maximum(cols.min(1).values.clamp(max=0).abs(), cols.max(1).values.clamp(min=0))
        scale = (amax / (maxq / 2)).float().half().double()        # stored as fp16
        scale[scale == 0] = 1
        return scale, torch.full_like(scale, (maxq + 1) // 2)

    order = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    fixed = [grid(w[:, j * gs:(j + 1) * gs]) for j in range(n // gs)] if act_order else None
    w, h = w[:, order], h[order][:, order]
    h += damp * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes = torch.zeros_like(w)
    scale = zero = None
    for i in range(n):
        g = int(order[i]) // gs
        if act_order:
            scale, zero = fixed[g]
        elif i % gs == 0:
            scale, zero = grid(w[:, i:i + gs])
        q = torch.clamp(torch.round(w[:, i] / scale) + zero, 0, maxq)
        codes[:, i] = q
        err = (w[:, i] - (q - zero) * scale) / u[i, i]
        w[:, i:] -= err[:, None] * u[i, i:][None, :]
    return codes[:, torch.argsort(order)]


def calibration_like(n_in, tokens=512, seed=0):
    """Inputs with the structure real activations have: correlated channels, a few large ones."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n_in, generator=g) @ torch.randn(n_in, n_in, generator=g) / n_in ** 0.5
    x[:, :3] *= 8
    return x


@pytest.mark.parametrize("group_size,block,act_order", [(16, 8, False), (16, 128, False), (-1, 32, False),
                                                         (32, 16, True), (16, 64, True)])
def test_blocked_gptq_equals_the_papers_unblocked_algorithm(group_size, block, act_order):
    torch.manual_seed(1)
    w = torch.randn(24, 64)
    h = wna16.hessian(calibration_like(64))
    codes, scale, zero = wna16.gptq(w, h, 4, group_size, act_order=act_order, block=block)
    expected = reference_gptq(w, h, 4, group_size, act_order=act_order)
    # float32 blocked vs float64 unblocked: a code may flip where a value sits on a rounding boundary
    assert (codes != expected).float().mean() < 0.005
    assert codes.min() >= 0 and codes.max() <= 15
    g = w.shape[1] if group_size == -1 else group_size
    assert scale.shape == (24, 64 // g)


def test_gptq_beats_round_to_nearest_on_a_real_layer_with_the_same_calibration(tiny_llama):
    from leantune.export.calibration import LayerWalk

    torch.manual_seed(0)
    rows = torch.randint(0, tiny_llama.config.vocab_size, (8, 64))
    walk = LayerWalk(tiny_llama, rows)
    seen = []
    lin = tiny_llama.model.layers[0].self_attn.q_proj
    handle = lin.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    walk.run(tiny_llama.model.layers[0])
    handle.remove()
    x = torch.cat(seen)
    w = lin.weight.detach()
    ref = x @ w.T

    def mse(codes, scale, zero):
        return float((x @ wna16.dequantize(codes, scale, zero).T - ref).pow(2).mean())

    rtn = mse(*wna16.rtn(w, 4, 32, sym=True))
    gptq = mse(*wna16.gptq(w, wna16.hessian(x), 4, 32))
    gptq_ordered = mse(*wna16.gptq(w, wna16.hessian(x), 4, 32, act_order=True))
    assert gptq < 0.9 * rtn
    assert gptq_ordered < 0.9 * rtn


def test_the_packings_round_trip():
    torch.manual_seed(0)
    for bits in (4, 8):
        q = torch.randint(0, 2 ** bits, (64, 96))
        scale, zero = torch.rand(64, 3) + 0.1, torch.randint(1, 2 ** bits, (64, 3)).float()
        assert torch.equal(wna16.unpack_rows(wna16.pack_rows(q, bits), bits), q)
        back = wna16.unpack_gptq(wna16.pack_gptq(q, scale, zero, bits), bits)
        assert torch.equal(back[0], q) and torch.equal(back[2], zero)
        back = wna16.unpack_ct(wna16.pack_ct(q, scale, zero, bits, False, torch.float16), bits)
        assert torch.equal(back[0], q) and torch.equal(back[2], zero)
    q = torch.randint(0, 16, (64, 96))
    back = wna16.unpack_awq(wna16.pack_awq(q, scale, zero.clamp(max=15)))
    assert torch.equal(back[0], q) and torch.equal(back[2], zero.clamp(max=15))


# ---------------------------------------------------------------------------------------------------------
# The command


@pytest.fixture
def calib_file(tmp_path):
    from tests.conftest import CORPUS

    path = tmp_path / "calib.txt"
    path.write_text("\n".join(CORPUS[:30]) + "\n")
    return path


def _export(args, capsys):
    from leantune.cli.main import main

    rc = main(["export", *args, "--quiet", "--no-eval"])
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("extra,message", [
    (["--bits", "3"], "--bits 3: vLLM loads 4- and 8-bit GPTQ only"),
    (["--group-size", "48"], "--group-size 48 does not divide the 64 inputs"),
    (["--calibration", "EMPTY"], "is empty"),
    ([], "is not a leantune run, so it has no training data to calibrate on; pass --calibration"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_llama_dir, tmp_path, calib_file, capsys, extra, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    extra = [str(empty) if a == "EMPTY" else a for a in extra]
    if "--calibration" not in extra and extra:
        extra += ["--calibration", str(calib_file)]
    out = tmp_path / "out"
    rc, err = _export([str(tiny_llama_dir), "--format", "gptq", "--out", str(out), *extra], capsys)
    assert rc == 2
    assert message in err[-1] and err[-1].startswith("error")
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_an_existing_output_is_refused_and_left_alone(tiny_llama_dir, tmp_path, calib_file, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    rc, err = _export([str(tiny_llama_dir), "--format", "gptq", "--out", str(out), "--calibration", str(calib_file)],
                      capsys)
    assert rc == 2 and len([line for line in err if line.startswith("error")]) == 1
    assert [p.name for p in out.iterdir()] == ["mine.txt"]


def test_the_default_export_is_what_vllm_loads(tiny_llama_dir, tmp_path, calib_file, capsys):
    out = tmp_path / "m-gptq"
    rc, err = _export([str(tiny_llama_dir), "--format", "gptq", "--out", str(out), "--calibration", str(calib_file),
                       "--calibration-samples", "4", "--calibration-seq", "32"], capsys)
    assert rc == 0, err
    qc = json.loads((out / "quantize_config.json").read_text())
    assert (qc["bits"], qc["sym"], qc["desc_act"], qc["quant_method"]) == (4, True, False, "gptq")
    assert qc["group_size"] == 64                  # 128 does not divide the tiny model's 64 inputs: the largest that does
    assert json.loads((out / "config.json").read_text())["quantization_config"] == qc
    assert any("calibration: 4 x 32 tokens" in line for line in err)
