"""The Chat tab against a real `leantune serve` (a tiny random Llama with two tiny LoRA adapters, an API key)
on a free port, with `leantune ui --serve URL --api-key KEY` in front of it: the adapter picker lists the
server's models, a message sent from the keyboard streams back the reply the server itself gives without
streaming (greedy), Clear empties the conversation, the key never reaches the page, and a phone-width page
does not scroll sideways. Without a server the tab shows the `leantune serve` command for the runs it sees."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from .conftest import free_port

pytest.importorskip("fastapi")
KEY = "sk-chat-test-4711"


@pytest.fixture(scope="module")
def serve_url(tmp_path_factory, tiny_llama_dir):
    """`leantune serve TINY --adapters RUNS --api-key KEY` in its own process; two adapters with random
    (non-zero) LoRA weights, so each answers differently from the base."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    runs = tmp_path_factory.mktemp("chat-runs")
    for i, name in enumerate(("alpha", "beta")):
        torch.manual_seed(10 + i)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
        m = get_peft_model(base, LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
        (runs / name).mkdir()
        (runs / name / "config.yaml").write_text(f"model: {tiny_llama_dir}\n")
        (runs / name / "summary.json").write_text("{}")
        m.save_pretrained(runs / name / "adapter")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "leantune.cli.main", "serve", str(tiny_llama_dir), "--adapters",
                             str(runs), "--port", str(port), "--served-model-name", "tiny", "--api-key", KEY],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "leantune serve did not answer /health in 180 s"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def run_ui(app):
    import uvicorn

    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", srv, thread


@pytest.fixture(scope="module")
def chat_ui(serve_url, runs_root):
    from leantune.ui.app import create_app

    url, srv, thread = run_ui(create_app(runs_root, serve_url=serve_url, api_key=KEY))
    yield url
    srv.should_exit = True
    thread.join(timeout=10)


def greedy(serve_url: str, model: str, messages: list[dict], max_tokens: int) -> str:
    r = httpx.post(serve_url + "/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=120,
                   json={"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_the_proxy_streams_and_adds_the_key(chat_ui, serve_url):
    assert httpx.get(serve_url + "/v1/models").status_code == 401  # the server wants the key ...
    assert [m["id"] for m in httpx.get(chat_ui + "/v1/models").json()["data"]] == ["tiny", "alpha", "beta"]  # ... the proxy adds it
    info = httpx.get(chat_ui + "/api/chat").json()
    assert info["server"] == serve_url and KEY not in str(info)
    events = []
    with httpx.stream("POST", chat_ui + "/v1/chat/completions", timeout=120,
                      json={"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                            "temperature": 0, "max_tokens": 6}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [ln for ln in r.iter_lines() if ln.startswith("data:")]
    assert events[-1] == "data: [DONE]" and len(events) >= 3


def test_chat_tab_streams_the_servers_greedy_reply_from_the_keyboard(browser, chat_ui, serve_url, artifacts):
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(chat_ui + "/#chat")
        page.wait_for_selector("body[data-chat=ready]")
        assert page.locator("#chat-model option").all_inner_texts() == ["tiny", "alpha", "beta"]
        page.fill("#chat-max", "8")
        page.focus("#chat-model")               # the keyboard alone: pick beta, type, Ctrl+Enter
        page.keyboard.press("ArrowDown")
        page.keyboard.press("ArrowDown")
        assert page.eval_on_selector("#chat-model", "e => e.value") == "beta"
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "chat-input"
        page.keyboard.type("the quick brown fox")
        page.keyboard.press("Control+Enter")
        page.wait_for_selector("#chat-log li.assistant[data-done]", timeout=120_000)
        reply = page.inner_text("#chat-log li.assistant .text")
        first = [{"role": "user", "content": "the quick brown fox"}]
        assert reply == greedy(serve_url, "beta", first, 8) and reply
        assert reply != greedy(serve_url, "alpha", first, 8)  # the picker chose the adapter
        # a second turn carries the first: the server sees the whole conversation
        page.fill("#chat-input", "and then")
        page.click("#chat-send")
        page.wait_for_selector("#chat-log li.assistant[data-done] >> nth=1", timeout=120_000)
        second = page.locator("#chat-log li.assistant .text").nth(1).inner_text()
        convo = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "and then"}]
        assert second == greedy(serve_url, "beta", convo, 8)
        assert KEY not in page.content()
        assert KEY not in str(page.evaluate("JSON.stringify(localStorage) + JSON.stringify(sessionStorage)"))
        page.screenshot(path=str(artifacts / "chat.png"), full_page=True)
        page.click("#chat-clear")
        assert page.locator("#chat-log li").count() == 0
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(artifacts / "chat-narrow.png"), full_page=True)
    finally:
        ctx.close()
    assert not errors, errors


def test_without_a_server_the_tab_shows_the_serve_command(page, runs_root, artifacts):
    from leantune.ui.app import serve_commands

    page.click("nav a[data-tab=chat]")
    page.wait_for_selector("body[data-chat=none]")
    assert page.is_hidden("#chat-form")
    text = page.inner_text("#chat-commands")
    assert text == "\n".join(serve_commands(runs_root))
    assert text == f"leantune serve ./SmolLM2-135M --adapters {runs_root} --port 8000"  # the one run with an adapter
    page.screenshot(path=str(artifacts / "chat-no-server.png"), full_page=True)


def test_no_server_answers_503_naming_the_command_and_a_bad_url_is_one_line(server, runs_root, capsys):
    from leantune.cli.main import main

    r = httpx.get(server + "/v1/models")
    assert r.status_code == 503
    assert r.json()["error"] == (f"no server to chat with: start one (`leantune serve ./SmolLM2-135M --adapters "
                                 f"{runs_root} --port 8000`), then `leantune ui --serve http://127.0.0.1:8000`")
    assert main(["ui", "--serve", "127.0.0.1:8000", "--port", str(free_port())]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith("e.g. --serve http://127.0.0.1:8000")


def test_the_page_connects_to_a_server_from_its_own_form(browser, serve_url, runs_root, artifacts):
    from leantune.ui.app import create_app

    url, srv, thread = run_ui(create_app(runs_root))  # no --serve: the tab offers the Connect form
    ctx = browser.new_context(viewport={"width": 1200, "height": 900})
    page = ctx.new_page()
    try:
        page.goto(url + "/#chat")
        page.wait_for_selector("body[data-chat=none]")
        page.fill("#connect-url", serve_url)
        page.fill("#connect-key", "wrong-key")
        page.click("#connect-go")
        page.wait_for_selector("#chat-error:visible")
        assert "api key" in page.inner_text("#chat-error").lower()  # the server's own 401 message
        page.fill("#connect-key", KEY)  # the form stays: connect again
        page.click("#connect-go")
        page.wait_for_selector("body[data-chat=ready]")
        assert page.locator("#chat-model option").all_inner_texts() == ["tiny", "alpha", "beta"]
        assert page.input_value("#connect-key") == "" and KEY not in page.content()
        assert httpx.get(url + "/api/chat").json() == {"server": serve_url, "can_set": True,
                                                        "commands": httpx.get(url + "/api/chat").json()["commands"]}
        page.screenshot(path=str(artifacts / "chat-connect.png"), full_page=True)
    finally:
        ctx.close()
        srv.should_exit = True
        thread.join(timeout=10)


def test_connect_is_refused_beyond_this_machine_and_a_bad_url_is_one_line(runs_root):
    from starlette.testclient import TestClient

    from leantune.ui.app import create_app

    remote = TestClient(create_app(runs_root, allow_start=False))  # what `--host 0.0.0.0` builds
    r = remote.post("/api/chat", json={"server": "http://127.0.0.1:8000", "api_key": "k"})
    assert r.status_code == 403 and "--serve URL" in r.json()["error"]
    assert remote.get("/api/chat").json()["server"] is None
    local = TestClient(create_app(runs_root))
    r = local.post("/api/chat", json={"server": "localhost:8000"})
    assert r.status_code == 400 and r.json()["error"].startswith("server 'localhost:8000' is not a URL; e.g. http://")
