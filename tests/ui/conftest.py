"""Browser tests of `leantune ui`: the app on a free port in a thread, Debian's chromium driven by pip
playwright through executable_path (never `playwright install`: it downloads from outside). Screenshots go
to $LEANTUNE_UI_ARTIFACTS or a temp folder, whose path is printed. Without chromium the tests skip loudly;
CI installs it (.ci/run)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]


def chromium_path() -> str | None:
    for p in (os.environ.get("LEANTUNE_CHROMIUM"), "/usr/bin/chromium", "/usr/bin/chromium-browser",
              shutil.which("chromium") or "", shutil.which("chromium-browser") or ""):
        if p and os.access(p, os.X_OK):
            return p
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(path: Path, steps: range, start_loss: float, eval_every: int = 0, memory: dict | None = None) -> None:
    with open(path, "a") as f:
        for i in steps:
            f.write(json.dumps({"step": i, "loss": start_loss * 0.97 ** i, "lr": 1e-4, "tokens_per_s": 900.0}) + "\n")
            if i == 1 and memory:
                f.write(json.dumps({"step": 1, **memory}) + "\n")
            if eval_every and i % eval_every == 0:
                f.write(json.dumps({"step": i, "eval_loss": start_loss * 0.98 ** i, "eval_ppl": 3.0}) + "\n")


MEMORY = {"mem_peak_bytes": 900 * 2**20, "mem_base_weights_bytes": 513 * 2**20, "mem_trainable_bytes": 18 * 2**20,
          "mem_gradients_bytes": 18 * 2**20, "mem_optimizer_state_bytes": 37 * 2**20,
          "mem_activations_bytes": 120 * 2**20, "mem_peak_source": "peak RSS (VmHWM)"}


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    """Two run folders as `leantune train` lays them out: one finished (summary, memory, data report,
    checkpoints, an auto_fit record) and one running (its lock names this live process)."""
    root = tmp_path_factory.mktemp("runs")
    done = root / "lora-done"
    (done / "checkpoints" / "step-000040").mkdir(parents=True)
    (done / "checkpoints" / "step-000040" / "trainable.safetensors").write_bytes(b"\0" * 4096)
    (done / "adapter").mkdir()
    (done / "config.yaml").write_text("model: ./SmolLM2-135M\nmethod: lora\ndata: {max_length: 128}\n"
                                      "train: {batch_size: 4, grad_accum: 2, lr: 0.0002}\n")
    _metrics(done / "metrics.jsonl", range(1, 41), 3.0, eval_every=10, memory=MEMORY)
    (done / "data_report.json").write_text(json.dumps({"records_read": 120, "records_kept": 118, "skipped": {"empty": 2},
                                                       "train_rows": 100, "eval_rows": 18, "mean_tokens": 57.5}))
    (done / "summary.json").write_text(json.dumps({
        "status": "completed", "steps": 40, "total_steps": 40, "train_loss": 0.89, "eval_loss": 1.1,
        "memory": MEMORY, "fit": {"choice": "LoRA, AdamW, no checkpointing, micro-batch 4 x 2 accumulation",
                                  "budget_bytes": 2**30, "predicted_peak_bytes": 880 * 2**20,
                                  "measured_peak_bytes": MEMORY["mem_peak_bytes"]}}))
    live = root / "qlora-live"
    live.mkdir()
    (live / "config.yaml").write_text("model: ./SmolLM2-135M\nmethod: lora\nquant: {bits: 4}\ntrain: {batch_size: 2}\n")
    (live / "leantune.lock").write_text(f"{os.getpid()} {socket.gethostname()}\n")
    _metrics(live / "metrics.jsonl", range(1, 11), 3.4)
    return root


@pytest.fixture(scope="session")
def server(runs_root):
    """The app on a free port of 127.0.0.1, in a thread of this process; its base URL."""
    import uvicorn

    from leantune.ui.app import create_app

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(runs_root), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started:
        if time.time() > deadline:
            raise RuntimeError("the ui server did not start in 30 s")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory) -> Path:
    d = Path(os.environ["LEANTUNE_UI_ARTIFACTS"]) if os.environ.get("LEANTUNE_UI_ARTIFACTS") \
        else tmp_path_factory.mktemp("ui-screenshots")
    d.mkdir(parents=True, exist_ok=True)
    print(f"\nleantune ui screenshots: {d}", file=sys.stderr)
    return d


@pytest.fixture(scope="session")
def browser():
    exe = chromium_path()
    if exe is None:
        msg = ("\n" + "!" * 100 + "\nSKIPPING THE BROWSER TESTS OF `leantune ui`: no chromium found (looked for "
               "$LEANTUNE_CHROMIUM, /usr/bin/chromium, chromium on PATH).\nInstall it: `apt-get install -y chromium` "
               "(CI does, .ci/run).\n" + "!" * 100)
        print(msg, file=sys.stderr)
        warnings.warn(msg, stacklevel=1)
        pytest.skip("no chromium: apt-get install -y chromium (see the message above)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:  # playwright gives the browser a fresh temporary profile itself
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.goto(server + "/")
    pg.wait_for_selector("body[data-ready=guide]")
    yield pg
    ctx.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
