"""Our GGUF files in a real llama.cpp: greedy tokens and top-1 agreement against the torch model.

llama.cpp comes prebuilt from the npm registry (node-llama-cpp's linux-x64 CPU build, no compile) and is
driven by tests/llamacpp/run_llamacpp.mjs; `bash tests/llamacpp/install.sh` puts it in .cache/llamacpp
(.ci/run does). Where it is missing these tests skip, loudly, naming the install command.

Files: Q8_0 and Q4_K_M of a tiny random Llama (hidden 256, so the k-quants apply) with a byte-level BPE
tokenizer, and a LoRA GGUF loaded by llama.cpp over our F16 export of the base. References: the torch
model (with the LoRA merged) for greedy tokens and top-1 agreement, and the same GGUF read back by
transformers (every tensor dequantized) for the logits, which isolates how llama.cpp reads our bytes
from the quantization error itself. llama.cpp's CPU kernels round the activations to 8 bits for
quantized matmuls, so its logits differ from a float32 dequantized forward by a little more than F16's.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

ROOT = Path(__file__).resolve().parents[2]
DRIVER = ROOT / "tests" / "llamacpp" / "run_llamacpp.mjs"
LLAMACPP_DIR = Path(os.environ.get("LEANTUNE_LLAMACPP_DIR", ROOT / ".cache" / "llamacpp"))
TEXT = ("the quick brown fox jumps over the lazy dog. what is the capital of france? paris is the capital "
        "of france, and the river seine runs through it. the dog sleeps in the sun all afternoon.")


def _missing() -> str | None:
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the prebuilt llama.cpp is linux-x64 only, this is {platform.system()}-{platform.machine()}"
    if shutil.which("node") is None:
        return "node is not on PATH (node >= 20 runs the llama.cpp driver)"
    if not (LLAMACPP_DIR / "node_modules" / "@node-llama-cpp" / "linux-x64").is_dir():
        return f"{LLAMACPP_DIR} has no node-llama-cpp build"
    return None


@pytest.fixture(scope="module")
def llamacpp():
    problem = _missing()
    if problem:
        msg = (f"LLAMA.CPP NOT INSTALLED, GGUF NOT CHECKED IN llama.cpp: {problem}. "
               f"Install it with: bash tests/llamacpp/install.sh")
        warnings.warn(msg)
        pytest.skip(msg)

    def run(runs: list[dict], tmp: Path) -> list[dict]:
        spec = tmp / "spec.json"
        spec.write_text(json.dumps({"runs": runs}))
        env = {**os.environ, "LLAMACPP_DIR": str(LLAMACPP_DIR)}
        done = subprocess.run(["node", str(DRIVER), str(spec)], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout)

    return run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tests.conftest import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("llamacpp-llama"), hidden=256, layers=4)


def _torch_top1_and_greedy(model, ids: list[int], prompt: list[int], n: int):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0]
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0, eos_token_id=None)
    return logits, logits.argmax(-1).tolist(), out[0, len(prompt):].tolist()


def _agreement(a: list[int], b: list[int]) -> float:
    return float(np.mean(np.array(a) == np.array(b)))

def _f32_in_llamacpp(llamacpp, tmp_path, folder, model, tok, stem: str, **write):
    """Export `model` as F32, run TEXT and a greedy continuation in llama.cpp: (ids, logit error relative to
    the torch logits' spread, top-1 agreement, greedy tokens equal)."""
    from leantune.export.gguf.writer import write_gguf

    path = tmp_path / f"{stem}.gguf"
    write_gguf(model, tok, folder, path, "F32", progress=False, **write)
    ids, prompt, n = tok(TEXT)["input_ids"], tok("the quick brown fox")["input_ids"], 8
    ref_logits, ref_top1, ref_greedy = _torch_top1_and_greedy(model, ids, prompt, n)
    (got,) = llamacpp([{"model": str(path), "lora": None, "tokens": ids, "prompt": prompt, "n_predict": n}], tmp_path)
    err = float(np.abs(np.array(got["logits"]) - ref_logits.numpy()).max()) / float(ref_logits.std())
    return ids, err, _agreement(got["top1"], ref_top1), got["greedy"] == ref_greedy


def _prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@pytest.mark.slow  # two exports, transformers' GGUF reader and llama.cpp: ~1-2 min on 2 idle cores
def test_quantized_files_run_in_llama_cpp(llamacpp, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leantune.export.gguf.writer import write_gguf

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids, prompt, n = tok(TEXT)["input_ids"], tok("the quick brown fox")["input_ids"], 16
    ref_logits, ref_top1, ref_greedy = _torch_top1_and_greedy(model, ids, prompt, n)
    files = {}
    for quant in ("Q8_0", "Q4_K_M"):
        files[quant] = tmp_path / f"m-{quant}.gguf"
        write_gguf(model, tok, model_dir, files[quant], quant, progress=False)
    results = llamacpp([{"model": str(p), "lora": None, "tokens": ids, "prompt": prompt, "n_predict": n}
                        for p in files.values()], tmp_path)
    report = {}
    for (quant, path), got in zip(files.items(), results):
        back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            deq = back(input_ids=torch.tensor([ids])).logits[0].numpy()
        cpp = np.array(got["logits"], dtype=np.float64)
        assert cpp.shape == deq.shape
        spread = float(deq.std())
        report[quant] = {"top1_vs_torch": _agreement(got["top1"], ref_top1),
                         "top1_vs_dequantized": _agreement(got["top1"], deq.argmax(-1).tolist()),
                         "logit_err_vs_dequantized": float(np.abs(cpp - deq).max()) / spread,
                         "greedy_prefix": _prefix(got["greedy"], ref_greedy),
                         "greedy_agreement": _agreement(got["greedy"], ref_greedy)}
    print(json.dumps(report, indent=1))
    # llama.cpp reads our bytes as gguf/transformers do: logits within a few % of their spread
    assert report["Q8_0"]["logit_err_vs_dequantized"] < 0.08, report
    assert report["Q4_K_M"]["logit_err_vs_dequantized"] < 0.12, report
    # and agrees with the torch model it came from
    assert report["Q8_0"]["top1_vs_torch"] >= 0.95 and report["Q8_0"]["greedy_prefix"] >= 8, report
    assert report["Q4_K_M"]["top1_vs_torch"] >= 0.75, report


@pytest.mark.slow
def test_lora_gguf_over_f16_base_in_llama_cpp(llamacpp, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leantune.adapters.base import unload
    from leantune.adapters.lora import inject_lora
    from leantune.export.gguf.lora import write_lora_gguf
    from leantune.export.gguf.writer import write_gguf

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids, prompt, n = tok(TEXT)["input_ids"], tok("the quick brown fox")["input_ids"], 16
    base_path, lora_path = tmp_path / "base-F16.gguf", tmp_path / "lora.gguf"
    write_gguf(model, tok, model_dir, base_path, "F16", progress=False)
    _, base_top1, _ = _torch_top1_and_greedy(model, ids, prompt, n)
    inject_lora(model, rank=8, alpha=16, targets=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"])
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.2)  # large enough to change the predictions
    write_lora_gguf(model, "llama", lora_path, "test")
    unload(model, merge=True)
    model.eval()
    ref_logits, ref_top1, ref_greedy = _torch_top1_and_greedy(model, ids, prompt, n)
    assert _agreement(ref_top1, base_top1) < 0.8  # the adapter matters, so agreement below is its doing
    got, base_only = llamacpp([
        {"model": str(base_path), "lora": str(lora_path), "tokens": ids, "prompt": prompt, "n_predict": n},
        {"model": str(base_path), "lora": None, "tokens": ids, "prompt": prompt, "n_predict": n}], tmp_path)
    cpp = np.array(got["logits"], dtype=np.float64)
    err = float(np.abs(cpp - ref_logits.numpy()).max()) / float(ref_logits.std())
    report = {"top1_vs_merged_torch": _agreement(got["top1"], ref_top1), "logit_err": err,
              "greedy_prefix": _prefix(got["greedy"], ref_greedy),
              "base_only_top1_vs_base_torch": _agreement(base_only["top1"], base_top1)}
    print(json.dumps(report, indent=1))
    assert report["base_only_top1_vs_base_torch"] >= 0.95, report
    assert err < 0.05 and report["top1_vs_merged_torch"] >= 0.95 and report["greedy_prefix"] >= 8, report


@pytest.mark.slow
def test_qwen3_runs_in_llama_cpp(llamacpp, tmp_path):
    """Qwen3 (per-head q/k RMSNorm, head_dim given apart from hidden / heads, NEOX RoPE): an F32 export's
    logits in llama.cpp match the torch model's."""
    from tests.parity.test_gguf_archs import tiny_qwen3

    folder, model, tok = tiny_qwen3(tmp_path)
    _, err, top1, greedy = _f32_in_llamacpp(llamacpp, tmp_path, folder, model, tok, "qwen3")
    assert err < 0.02 and top1 >= 0.97 and greedy, err


@pytest.mark.slow
def test_llama3_rope_scaling_runs_in_llama_cpp(llamacpp, tmp_path):
    """Llama 3.1-style RoPE scaling (rope_freqs.weight) over a text longer than the original context:
    llama.cpp's logits match the torch model's, so the scaled frequencies are applied as torch does."""
    from tests.parity.test_gguf_archs import LLAMA3_ROPE, tiny_llama_rope

    folder, model, tok = tiny_llama_rope(tmp_path, LLAMA3_ROPE)
    ids, err, top1, _ = _f32_in_llamacpp(llamacpp, tmp_path, folder, model, tok, "l3")
    assert len(ids) > 2 * LLAMA3_ROPE["original_max_position_embeddings"]
    assert err < 0.02 and top1 >= 0.97, err


@pytest.mark.slow
def test_phi3_runs_in_llama_cpp(llamacpp, tmp_path):
    """Phi-3 (fused qkv and gate_up kept fused): an F32 export's logits in llama.cpp match torch's."""
    from tests.parity.test_gguf_archs import tiny_phi3

    folder, model, tok = tiny_phi3(tmp_path)
    # name="tiny": llama.cpp's vocab loader looks up Phi's own special tokens (<|end|> ...) when the model
    # name says phi, and this test tokenizer has none (measured: "error loading model vocabulary: _Map_base::at")
    _, err, top1, greedy = _f32_in_llamacpp(llamacpp, tmp_path, folder, model, tok, "phi3", name="tiny")
    assert err < 0.02 and top1 >= 0.97 and greedy, err


@pytest.mark.slow
@pytest.mark.parametrize("version", [2, 3])
def test_gemma_runs_in_llama_cpp(llamacpp, tmp_path, version):
    """Gemma 2 / Gemma 3 (norms + 1, four norms a layer, softcapping, a sliding window of 8 over a ~45-token
    text, embedding scale, Gemma 3's q/k norms and two rope bases): an F32 export's logits in llama.cpp
    match the torch model's."""
    from tests.parity.test_gguf_archs import tiny_gemma

    folder, model, tok = tiny_gemma(tmp_path, version)
    ids, err, top1, greedy = _f32_in_llamacpp(llamacpp, tmp_path, folder, model, tok, f"gemma{version}")
    assert len(ids) > 4 * model.config.sliding_window
    assert err < 0.02 and top1 >= 0.97 and greedy, err