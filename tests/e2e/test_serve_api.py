"""`leantune serve` over HTTP, driven by the official openai client against a live server on 127.0.0.1
(a random free port): model list with parents, chat and completion (streaming and not, usage), errors
as the client's own exceptions, the API key, adapter paths that try to leave the adapter folder, oversize
requests, a client that disconnects mid-stream, a malformed adapter refused while the others serve."""

from __future__ import annotations

import copy
import json
import socket
import threading
import time
import warnings

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")
pytest.importorskip("fastapi")

from leantune.errors import ConfigError  # noqa: E402
from leantune.serve.api import Limits, build_app, port_free  # noqa: E402
from leantune.serve.engine import Engine  # noqa: E402

KEY = "test-key-123"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    root = tmp_path_factory.mktemp("adapters")
    for i, name in enumerate(["legal", "support", "spare"]):
        torch.manual_seed(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.3)
        m.save_pretrained(root / name)
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    return root


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tiny_tokenizer, adapter_root):
    import uvicorn
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    engine = Engine(model, tiny_tokenizer, max_loras=2)
    engine.add_adapter("legal", adapter_root / "legal")
    engine.add_adapter("support", adapter_root / "support")
    app = build_app(engine, "tiny", api_key=KEY, adapter_root=adapter_root,
                    limits=Limits(max_tokens=64, max_request_bytes=4096, max_concurrent=8))
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=srv.run, daemon=True)
    engine.start()
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", engine
    srv.should_exit = True
    thread.join(timeout=10)
    engine.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_list_the_base_and_adapters_with_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny", "legal", "support"}
    assert models["legal"].parent == "tiny" and models["tiny"].parent is None


def test_chat_completion_counts_usage_and_model_picks_the_adapter(client, tiny_tokenizer):
    messages = [{"role": "user", "content": "the capital of france"}]
    got = client.chat.completions.create(model="legal", messages=messages, max_tokens=8, temperature=0)
    ids = tiny_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == len(ids)
    assert got.usage.completion_tokens <= 8 and got.usage.total_tokens == len(ids) + got.usage.completion_tokens
    assert got.choices[0].finish_reason in ("stop", "length")
    base = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert base.choices[0].message.content != got.choices[0].message.content   # model picks the adapter


def test_streaming_chat_joins_to_the_non_streamed_text_and_sends_usage(client):
    messages = [{"role": "user", "content": "write a haiku about the sea"}]
    whole = client.chat.completions.create(model="support", messages=messages, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="support", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_streamed_and_not(client):
    one = client.completions.create(model="legal", prompt="one two three", max_tokens=6, temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="legal", prompt="one two three", max_tokens=6, temperature=0, stream=True))
    assert streamed == one.choices[0].text and one.usage.completion_tokens <= 6
    seeded = [client.completions.create(model="tiny", prompt="a journey", max_tokens=6, temperature=1.0, seed=3)
              .choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_errors_are_openai_exceptions(client, server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=10_000)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="tiny", prompt="hi", temperature=9)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model="tiny", prompt="word " * 2000, max_tokens=4)
    assert e.value.status_code == 413 and e.value.body["code"] == "request_too_large"


def test_api_key_on_every_route_but_health(server):
    url = server[0]
    assert httpx.get(url + "/health").status_code == 200
    for route in ("/v1/models", "/metrics"):
        r = httpx.get(url + route)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 401


def test_adapter_paths_never_leave_the_adapter_folder(server, adapter_root, tmp_path):
    url, engine = server
    h = {"Authorization": f"Bearer {KEY}"}
    outside = tmp_path / "outside"
    outside.mkdir()
    (adapter_root / "link").symlink_to(outside)
    for name, path in [("x1", "../legal"), ("x2", str(outside)), ("x3", "/etc"), ("x4", "link"), ("x5", "spare/../../x")]:
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path}, headers=h)
        assert r.status_code == 400 and "outside the adapter directory" in r.json()["error"]["message"], path
    for bad in ("../legal", "/abs", "a/b", ".."):
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": bad}, headers=h)
        assert r.status_code == 400 and "not allowed" in r.json()["error"]["message"]
    assert "x1" not in engine.adapters


def test_load_unload_at_run_time_and_a_broken_adapter_is_refused(server, client):
    url, engine = server
    h = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "broken"}, headers=h)
    assert r.status_code == 400 and "broken" in r.json()["error"]["message"]
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "spare"}, headers=h)
    assert r.status_code == 200, r.text
    # three adapters, two slots: all three still answer (LRU swaps), and the others kept serving
    for name in ("spare", "legal", "support", "spare"):
        assert client.completions.create(model=name, prompt="hi", max_tokens=3, temperature=0).choices
    assert len(engine.resident()) == 2
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "spare"}, headers=h).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="spare", prompt="hi", max_tokens=3)


def test_a_client_that_disconnects_mid_stream_frees_its_row(server):
    url, engine = server
    body = {"model": "legal", "prompt": "the quick brown fox", "max_tokens": 64, "temperature": 0,
            "stream": True, "ignore_eos": True}
    engine_eos, engine.eos = engine.eos, set()
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
        deadline = time.time() + 20
        while (engine.running or engine.pending) and time.time() < deadline:
            time.sleep(0.05)
        assert not engine.running and not engine.pending
    finally:
        engine.eos = engine_eos


def test_metrics_use_the_leantune_prefix(server, client):
    client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    text = httpx.get(server[0] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for series in ("leantune_requests_total", "leantune_generation_tokens_total", "leantune_adapters_resident",
                   "leantune_request_latency_seconds_bucket", "leantune_time_to_first_token_seconds_count",
                   "leantune_requests_waiting"):
        assert series in text, series


def test_a_port_in_use_is_one_line(server):
    port = int(server[0].rsplit(":", 1)[1])
    with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}.*--port"):
        port_free("127.0.0.1", port)


def _in_flight(url: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    line = next(x for x in text.splitlines() if x.startswith("leantune_requests_in_flight "))
    return float(line.split()[1])


def _send_and_hang_up(url: str, body: dict) -> None:
    """POST `body` and close the socket before reading a byte of the answer."""
    host, port = url.removeprefix("http://").split(":")
    raw = json.dumps(body).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n").encode()
    with socket.create_connection((host, int(port))) as s:
        s.sendall(head + raw)
        s.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_hangs_up_before_the_first_byte_frees_its_count_and_row(server, stream):
    url, engine = server
    body = {"model": "legal", "prompt": "the quick brown fox", "max_tokens": 64, "temperature": 0,
            "stream": stream}
    engine_eos, engine.eos = engine.eos, set()     # the row would otherwise run all 64 tokens
    try:
        for _ in range(3):
            _send_and_hang_up(url, body)
        deadline = time.time() + 60   # a loaded CI box once needed more than 20 s here (seen 2026-11-27)
        while (engine.running or engine.pending or _in_flight(url)) and time.time() < deadline:
            time.sleep(0.05)
        state = (f"engine thread alive: {engine._thread is not None and engine._thread.is_alive()}; running rows: "
                 f"{[(len(r.tokens), r.cancelled) for r in engine.running]} (tokens, cancelled); pending: "
                 f"{len(engine.pending)}; waiting: {engine.waiting.qsize()}")
        assert not engine.running and not engine.pending, state
        assert _in_flight(url) == 0
    finally:
        engine.eos = engine_eos
