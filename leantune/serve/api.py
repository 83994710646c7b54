"""The OpenAI-compatible HTTP side of `leantune serve` (FastAPI): requests are checked here and queued to
the engine, which runs in one background thread (engine.py); tokens come back through an asyncio queue.

Routes (vLLM's names where vLLM has them):
  GET  /v1/models                 the base, then every adapter (with `parent` = the base)
  POST /v1/completions            prompt -> text; `model` = an adapter name, or the base's own name for none
  POST /v1/chat/completions       messages rendered with the adapter's run chat template; SSE with stream=true
  POST /v1/load_lora_adapter      {lora_name, lora_path}: only folders inside --adapters
  POST /v1/unload_lora_adapter    {lora_name}
  GET  /health                    no key needed
  GET  /metrics                   Prometheus text, names prefixed leantune_
Errors use OpenAI's shape, {"error": {"message", "type", "param", "code"}}, so the openai client raises
its usual exceptions (404 NotFoundError, 401 AuthenticationError, 400 BadRequestError, 429 RateLimitError).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fastapi import Request as HttpRequest   # at module level: FastAPI resolves route annotations by name

from ..errors import ConfigError, LeantuneError, first_line
from .adapter_folders import base_mismatch
from .engine import Engine, Request, check_name, check_sampling


@dataclass
class Limits:
    max_tokens: int = 1024               # per request
    max_request_bytes: int = 1 << 20     # the JSON body
    max_concurrent: int = 64             # generation requests in flight (queued + running)


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def inside(root: Path, candidate: str) -> Path:
    """`candidate` (relative to `root`, or absolute) resolved with symlinks; an ApiError unless it stays in root."""
    if not candidate or "\x00" in candidate:
        raise ApiError(400, "lora_path is empty", param="lora_path")
    path = (root / candidate).resolve()
    if path != root and root not in path.parents:
        raise ApiError(400, f"lora_path {candidate!r} is outside the adapter directory; adapters load only from "
                            f"folders inside --adapters", param="lora_path")
    return path


class InFlight:
    """Generation requests accepted and not yet finished; each one is released exactly once."""

    def __init__(self) -> None:
        self.count = 0

    def take(self, req: Request) -> Callable[[], None]:
        """Count `req`; the returned release (safe to call more than once) uncounts it and cancels its row."""
        self.count += 1
        done = False

        def release() -> None:
            nonlocal done
            req.cancel()          # a no-op once finished; frees the row when the client went away
            if not done:
                done = True
                self.count -= 1
        return release


class Metrics:
    """The Prometheus series, in a registry of their own (one per app)."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("leantune_requests", "HTTP requests by route and status", ["route", "code"], registry=r)
        self.prompt_tokens = Counter("leantune_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("leantune_generation_tokens", "Tokens generated", registry=r)
        buckets = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
        self.latency = Histogram("leantune_request_latency_seconds", "Time from request to last token",
                                 buckets=buckets, registry=r)
        self.ttft = Histogram("leantune_time_to_first_token_seconds", "Time from request to first token",
                              buckets=buckets, registry=r)
        Gauge("leantune_adapters_resident", "Adapters in a slot now", registry=r).set_function(
            lambda: len(engine.resident()))
        Gauge("leantune_adapters_loaded", "Adapters registered (servable by name)", registry=r).set_function(
            lambda: len(engine.adapters))
        Gauge("leantune_requests_waiting", "Requests queued, not yet in the batch", registry=r).set_function(
            engine.queue_depth)
        Gauge("leantune_requests_running", "Requests in the running batch", registry=r).set_function(
            lambda: len(engine.running))

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


def build_app(engine: Engine, base_name: str, *, api_key: str | None = None, adapter_root: str | Path | None = None,
              limits: Limits | None = None):
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response, StreamingResponse

    limits = limits or Limits()
    root = Path(adapter_root).resolve() if adapter_root is not None else None
    metrics = Metrics(engine)
    in_flight = InFlight()
    from prometheus_client import Gauge

    Gauge("leantune_requests_in_flight", "Generation requests accepted and not yet answered or abandoned",
          registry=metrics.registry).set_function(lambda: in_flight.count)
    app = FastAPI(title="leantune serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        route = request.url.path
        try:
            if api_key is not None and route != "/health":
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                    raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                                        "(the --api-key the server was started with)", "authentication_error",
                                   code="invalid_api_key")
            size = request.headers.get("content-length")
            if size is not None and (not size.isdigit() or int(size) > limits.max_request_bytes):
                raise ApiError(413, f"request body is larger than this server's cap ({limits.max_request_bytes} "
                                    "bytes); send a shorter prompt", code="request_too_large")
            response = await call_next(request)
        except ApiError as e:
            response = error_response(e)
        if route.startswith("/v1/"):
            known = route if route in KNOWN_ROUTES else "other"
            metrics.requests.labels(known, str(response.status_code)).inc()
        return response

    async def body_of(request: HttpRequest) -> dict:
        raw = await request.body()
        if len(raw) > limits.max_request_bytes:
            raise ApiError(413, f"request body is larger than this server's cap ({limits.max_request_bytes} bytes)",
                           code="request_too_large")
        try:
            body = json.loads(raw or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def adapter_for(model) -> str | None:
        if model == base_name:
            return None
        if not isinstance(model, str) or model not in engine.adapters:
            names = ", ".join([base_name, *engine.adapters])
            raise ApiError(404, f"the model {model!r} does not exist; served models: {names}", param="model",
                           code="model_not_found")
        return model

    def sampling_of(body: dict):
        try:
            return check_sampling(body.get("max_completion_tokens", body.get("max_tokens", 16)),
                                  body.get("temperature", 1.0), body.get("top_p", 1.0), body.get("stop"),
                                  body.get("seed"), cap=limits.max_tokens)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None

    def chat_prompt(adapter: str | None, messages) -> list[int]:
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ApiError(400, "each message needs a role of system, user or assistant", param="messages")
            content = m.get("content")
            if isinstance(content, list):   # [{"type": "text", "text": ...}]
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
            if not isinstance(content, str):
                raise ApiError(400, "message content must be text", param="messages")
            clean.append({"role": m["role"], "content": content})
        folder = engine.adapters.get(adapter) if adapter else None
        if folder is not None and folder.system_prompt and clean[0]["role"] != "system":
            clean.insert(0, {"role": "system", "content": folder.system_prompt})   # as the run trained
        template = folder.chat_template if folder is not None and folder.chat_template else None
        tok = engine.tok
        if template is None and not getattr(tok, "chat_template", None):
            raise ApiError(400, f"{adapter or base_name} has no chat template; use /v1/completions with a prompt")
        enc = tok.apply_chat_template(clean, chat_template=template, add_generation_prompt=True, tokenize=True)
        return list(enc["input_ids"] if hasattr(enc, "keys") else enc)

    async def generate(http: HttpRequest, body: dict, chat: bool):
        adapter = adapter_for(body.get("model"))
        sampling = sampling_of(body)
        if body.get("n", 1) != 1:
            raise ApiError(400, "n must be 1 (one choice per request)", param="n")
        if chat:
            prompt = chat_prompt(adapter, body.get("messages"))
        else:
            text = body.get("prompt")
            if isinstance(text, list) and len(text) == 1:
                text = text[0]
            if not isinstance(text, str):
                raise ApiError(400, "prompt must be a string (one prompt per request)", param="prompt")
            prompt = engine.tok(text)["input_ids"]
        if in_flight.count >= limits.max_concurrent:
            raise ApiError(429, f"the server is at its cap of {limits.max_concurrent} concurrent requests; retry "
                                "shortly", "rate_limit_error", code="too_many_requests")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req = Request(prompt, adapter, sampling, lambda kind, data: loop.call_soon_threadsafe(events.put_nowait,
                                                                                                (kind, data)))
        try:
            engine.submit(req)
        except LeantuneError as e:
            raise ApiError(400, first_line(e)) from None
        release = in_flight.take(req)
        model = body["model"]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def finish(data: dict) -> dict:
            metrics.prompt_tokens.inc(data["prompt_tokens"])
            metrics.generation_tokens.inc(data["completion_tokens"])
            metrics.latency.observe(time.perf_counter() - req.created)
            if req.first_token_at is not None:
                metrics.ttft.observe(req.first_token_at - req.created)
            return {"prompt_tokens": data["prompt_tokens"], "completion_tokens": data["completion_tokens"],
                    "total_tokens": data["prompt_tokens"] + data["completion_tokens"]}

        async def next_event():
            while True:
                try:
                    return await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        raise asyncio.CancelledError from None

        if not body.get("stream"):
            try:
                text = ""
                while True:
                    ev, data = await next_event()
                    if ev == "token":
                        text += data["text"]
                    elif ev == "error":
                        raise ApiError(500, data["message"], "server_error")
                    else:
                        break
            finally:
                release()
            usage = finish(data)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat else
                      {"index": 0, "text": text, "logprobs": None})
            choice["finish_reason"] = data["finish_reason"]
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": model,
                                 "choices": [choice], "usage": usage})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunk_kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            out = {"id": rid, "object": chunk_kind, "created": created, "model": model, "choices": [choice]}
            return f"data: {json.dumps(out)}\n\n"

        async def stream():
            try:
                first = True
                while True:
                    ev, data = await next_event()
                    if ev == "token":
                        yield chunk(data["text"], None, first)
                        first = False
                    elif ev == "error":
                        err = ApiError(500, data["message"], "server_error").body()
                        yield f"data: {json.dumps(err)}\n\n"
                        break
                    else:
                        usage = finish(data)
                        yield chunk(None, data["finish_reason"], first)
                        if include_usage:
                            tail = {"id": rid, "object": chunk_kind, "created": created, "model": model,
                                    "choices": [], "usage": usage}
                            yield f"data: {json.dumps(tail)}\n\n"
                        break
                yield "data: [DONE]\n\n"
            finally:    # also when the client disconnects mid-stream: its row leaves the batch next step
                release()

        class Released(StreamingResponse):
            """Releases the request however the response ends, also when the body was never started (a client
            gone before the first byte: the generator's own `finally` then never runs)."""

            async def __call__(self, scope, receive, send) -> None:
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    release()

        return Released(stream(), media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def handle(fn, *args):
        try:
            return await fn(*args)
        except ApiError as e:
            return error_response(e)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(metrics.text(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        data = [{"id": base_name, "object": "model", "created": created, "owned_by": "leantune", "root": base_name,
                 "parent": None}]
        data += [{"id": n, "object": "model", "created": created, "owned_by": "leantune", "root": str(a.path),
                  "parent": base_name} for n, a in list(engine.adapters.items())]
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        async def go():
            return await generate(http, await body_of(http), chat=False)
        return await handle(go)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        async def go():
            return await generate(http, await body_of(http), chat=True)
        return await handle(go)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(http: HttpRequest):
        async def go():
            body = await body_of(http)
            name = body.get("lora_name")
            try:
                check_name(name)
            except ConfigError as e:
                raise ApiError(400, str(e), param="lora_name") from None
            if name == base_name or name in engine.adapters:
                raise ApiError(400, f"the name {name!r} is taken; unload it first or pick another", param="lora_name")
            if root is None:
                raise ApiError(400, "this server loads adapters at run time only from its --adapters folder; "
                                    "restart it with --adapters DIR", param="lora_path")
            path = inside(root, str(body.get("lora_path") or name))
            try:
                await asyncio.to_thread(engine.add_adapter, name, path)
            except LeantuneError as e:
                raise ApiError(400, first_line(e), param="lora_path") from None
            said = f"Success: LoRA adapter '{name}' added successfully."
            if (other := base_mismatch(engine.model, path)) is not None:
                print(f"warning: adapter {name}: {other}", file=sys.stderr)
                said += f" Warning: {other}."
            return Response(said, media_type="text/plain")
        return await handle(go)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(http: HttpRequest):
        async def go():
            body = await body_of(http)
            name = body.get("lora_name")
            if not isinstance(name, str) or name not in engine.adapters:
                raise ApiError(404, f"no adapter named {name!r} is loaded", param="lora_name", code="model_not_found")
            engine.remove_adapter(name)
            return Response(f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")
        return await handle(go)

    return app


KNOWN_ROUTES = {"/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/load_lora_adapter",
                "/v1/unload_lora_adapter"}


def port_free(host: str, port: int) -> None:
    """A one-line ConfigError when `host:port` cannot be bound (in use, or not this machine's address)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port, "
                              f"or stop what holds it") from None


def env_api_key() -> str | None:
    return os.environ.get("LEANTUNE_API_KEY") or None
