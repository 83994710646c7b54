"""`leantune serve ARGS` as a user starts it, in a subprocess on a free port, for the e2e tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class Served:
    url: str
    err: str = ""      # the server's stderr, filled once it has stopped


@contextmanager
def leantune_serve(*args: str, wait_s: float = 180):
    """Start `leantune serve ARGS --port P`, yield a Served once /health answers, stop the server on exit."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "leantune.cli.main", "serve", *args, "--port", str(port)],
                            env=env, stderr=subprocess.PIPE, text=True)
    served = Served(f"http://127.0.0.1:{port}")
    try:
        deadline = time.time() + wait_s
        while time.time() < deadline:
            try:
                if httpx.get(served.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stderr.read()
                time.sleep(0.5)
        yield served
    finally:
        proc.terminate()
        served.err = proc.communicate(timeout=30)[1]
