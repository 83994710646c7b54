"""`leantune ui` without a browser: the JSON API answers as `leantune plan` does (the same plan, the same
one-line errors as 400s), the runs API reads a real run folder, `leantune ui` serves on 127.0.0.1, and a
taken port is one line with exit code 2."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from leantune.cli.main import main
from leantune.ui.app import create_app
from leantune.ui.guide import CATEGORIES, TECHNIQUES

CONFIGS = Path(__file__).parent.parent / "plan_configs"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def client(tmp_path):
    return TestClient(create_app(tmp_path))


def test_guide_covers_the_seed_techniques_and_leantunes_own(client):
    g = client.get("/api/guide").json()
    names = {t["id"] for t in g["techniques"]}
    seed = {"full", "lora", "qlora", "prefix", "prompt", "int8", "gptq", "awq", "gguf"}
    ours = {"dora", "ia3", "bottleneck", "galore", "merging", "serving"}
    assert seed | ours == names
    for t in TECHNIQUES:
        assert t["category"] in CATEGORIES and t["how"] and t["use_cases"] and t["limitations"], t["id"]
        assert t["paper"][1].startswith("https://") and t["command"], t["id"]
        if t["measured"]:  # every measured figure names a doc that exists
            for doc in t["measured"][1].split(", "):
                assert (REPO / doc).is_file(), (t["id"], doc)


def test_plan_api_is_the_cli_plan(client, capsys):
    body = {"model": str(CONFIGS / "Mistral-7B-v0.1.json"), "gpu": "RTX 4090", "seq": 2048, "batch": 4, "method": "lora"}
    got = client.post("/api/plan", json=body)
    assert got.status_code == 200
    assert main(["plan", body["model"], "--gpu", "RTX 4090", "--seq", "2048", "--batch", "4", "--method", "lora",
                 "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    api = got.json()
    assert [r["peak"] for r in api["rows"]] == [r["peak"] for r in cli["rows"]]
    assert api["reason"] == cli["reason"]


@pytest.mark.parametrize("body,message", [
    ({"gpu": "RTX 4909"}, "did you mean 'RTX 4090'"),
    ({"gpu": "24GB", "seq": 0}, "--seq must be > 0"),
    ({"gpu": "24GB", "seq": "2k"}, "seq must be a whole number"),
    ({"gpu": "24GB", "method": "lora2"}, "unknown method 'lora2'"),
    ({"model": ""}, "model is empty"),
])
def test_plan_api_bad_input_is_a_400_with_one_line(client, body, message):
    r = client.post("/api/plan", json={"model": str(CONFIGS / "Llama-3.1-8B.json"), **body})
    assert r.status_code == 400
    err = r.json()["error"]
    assert message in err and "\n" not in err


def test_plan_api_config_without_the_needed_fields(client, tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "vocab_size": 0, "num_hidden_layers": 0}))
    r = client.post("/api/plan", json={"model": str(bad), "gpu": "24GB"})
    assert r.status_code == 400 and "\n" not in r.json()["error"]
    assert client.post("/api/plan", content=b"not json").status_code == 400


def test_runs_api_reads_a_real_run_and_refuses_paths_outside_the_root(tiny_llama_dir, tmp_path):
    from tests.e2e.test_train_cli import base_args, write_chat_data

    root = tmp_path / "runs"
    out = root / "first"
    assert main(base_args(tiny_llama_dir, write_chat_data(tmp_path / "d.jsonl", n=16), out,
                          "--train.max_steps", "3", "--train.eval_every", "2", "--dtype", "fp32")) == 0
    c = TestClient(create_app(root))
    runs = c.get("/api/runs").json()["runs"]
    assert [(r["id"], r["status"], r["steps"]) for r in runs] == [("first", "completed", 3)]
    d = c.get("/api/runs/first").json()
    assert [p[0] for p in d["train"]] == [1, 2, 3] and [p[0] for p in d["eval"]] == [2, 3]
    assert d["memory"]["mem_peak_bytes"] > 0 and d["output"] == "adapter"
    assert d["data_report"] is not None and d["checkpoints"][-1]["step"] == 3
    assert c.get("/api/runs/..%2F..%2Fetc").status_code == 404
    assert c.get("/api/runs/nothing-here").status_code == 404


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_port_in_use_is_one_line_and_exit_2(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and f"--port {port + 1}" in err and err.count("\n") == 1


def test_leantune_ui_serves_the_page_on_localhost(tmp_path):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from leantune.cli.main import main; sys.exit(main())", "ui", "--root", str(tmp_path), "--port", str(port),
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    try:
        deadline, page = time.time() + 90, None
        while time.time() < deadline and page is None:
            try:
                page = httpx.get(f"http://127.0.0.1:{port}/", timeout=2)
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stdout.read()
                time.sleep(0.3)
        assert page is not None and page.status_code == 200 and "<title>leantune</title>" in page.text
        assert 'src="http' not in page.text and 'href="http' not in page.text  # no CDN: everything is local
        assert httpx.get(f"http://127.0.0.1:{port}/api/runs").json()["runs"] == []
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert f"leantune ui: http://127.0.0.1:{port}/" in out


def test_start_a_run_from_the_page_trains_it_under_the_root(tiny_llama_dir, tmp_path):
    from tests.e2e.test_train_cli import write_chat_data

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(f"model: {tiny_llama_dir}\ndata: {{path: {write_chat_data(tmp_path / 'd.jsonl', n=8)}, max_length: 64}}\n"
                   "lora: {rank: 4}\ntrain: {max_steps: 2, tensorboard: false}\ndtype: fp32\n")
    root = tmp_path / "runs"
    c = TestClient(create_app(root))
    r = c.post("/api/runs/start", json={"config": str(cfg), "name": "from-page"})
    assert r.status_code == 200, r.text
    deadline, status = time.time() + 240, None
    while time.time() < deadline and status not in ("completed", "stopped"):
        time.sleep(1)
        runs = c.get("/api/runs").json()["runs"]
        status = runs[0]["status"] if runs else None
    log = (root / "from-page" / "train.log").read_text()
    assert status == "completed", log
    assert c.get("/api/runs/from-page").json()["steps"] == 2
    again = c.post("/api/runs/start", json={"config": str(cfg), "name": "from-page"})
    assert again.status_code == 400 and "already exists" in again.json()["error"]


@pytest.mark.parametrize("body,message", [
    ({"config": "/nowhere/my.yaml"}, "is not a YAML file on this machine"),
    ({"config": __file__}, "is not a YAML file"),
    ({"config": "CFG", "name": "../escape"}, "use letters, digits"),
])
def test_start_refuses_bad_input(tmp_path, body, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: x\n")
    body = {k: (str(cfg) if v == "CFG" else v) for k, v in body.items()}
    r = TestClient(create_app(tmp_path / "runs")).post("/api/runs/start", json=body)
    assert r.status_code == 400 and message in r.json()["error"]


def test_start_is_off_when_the_page_listens_beyond_this_machine(tmp_path):
    r = TestClient(create_app(tmp_path, allow_start=False)).post("/api/runs/start", json={"config": "x.yaml"})
    assert r.status_code == 403 and "--host" in r.json()["error"]
