"""`leantune ui`: one static page (leantune/assets/ui/) and the JSON API it reads. No CDN, no build step.

    GET  /                      the page (guide, planner, runs)
    GET  /api/guide             the techniques (ui/guide.py)
    GET  /api/gpus              the named cards the planner knows
    POST /api/plan              {model, gpu, seq, batch, method} -> leantune.plan's plan as JSON
    GET  /api/runs              every run folder under --root
    GET  /api/runs/{id}         one run: curves, memory breakdown, data report, checkpoints
    POST /api/runs/start        {config, name} -> `leantune train CONFIG --output_dir ROOT/NAME` in a new process
                                (only when the page listens on this machine alone: it runs what a config says)
    GET  /api/chat              {server: URL or null, commands: the `leantune serve ...` lines for the runs seen}
    POST /api/chat              {server, api_key}: the page's Connect form (local pages only; the key stays here)
    GET|POST /v1/...            proxied to `leantune ui --serve URL` (streams pass through; --api-key is added
                                here, so the key never reaches the browser); 503 {error} with no server

The page calls the same functions as the CLI (`make_plan` is `leantune plan`). A bad request is a 400
with {"error": one line naming the fix}, the CLI's message.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from ..errors import ConfigError, LeantuneError
from . import runs as runs_mod
from .guide import guide

STATIC = Path(__file__).resolve().parent.parent / "assets" / "ui"
METHODS = ("lora", "dora", "ia3", "bottleneck", "prompt", "prefix", "full", "freeze")


def _bad(message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _int(body: dict, key: str, default: int | None) -> int | None:
    v = body.get(key, default)
    if v in (None, ""):
        return default
    if isinstance(v, bool) or not isinstance(v, (int, str)) or not str(v).strip().lstrip("-").isdigit():
        raise ConfigError(f"{key} must be a whole number, got {v!r}; e.g. {key}: {2048 if key == 'seq' else 4}")
    return int(v)


def plan_request(body: dict) -> dict:
    """The planner's answer for one form: what `leantune plan MODEL --gpu G --seq S --batch B --method M --json` prints."""
    from ..plan import make_plan

    model = str(body.get("model") or "").strip()
    if not model:
        raise ConfigError("model is empty; give a hub id (meta-llama/Llama-3.1-8B), a local folder, "
                            "a config.json, a leantune YAML, or `demo`")
    method = body.get("method") or None
    if method is not None and method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    gpu = str(body.get("gpu") or "").strip() or None
    plan = make_plan(model, gpu=gpu, seq=_int(body, "seq", None), batch=_int(body, "batch", None), method=method)
    return plan.as_dict()


def start_run(root: Path, body: dict) -> dict:
    """Spawn `leantune train CONFIG --output_dir ROOT/NAME` (its console goes to ROOT/NAME/train.log)."""
    import re
    import subprocess
    import sys
    import time

    config = Path(str(body.get("config") or "").strip()).expanduser()
    if not config.is_file() or config.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"config {str(config)!r} is not a YAML file on this machine; give the path of a leantune config")
    name = str(body.get("name") or "").strip() or f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise ConfigError(f"run name {name!r}: use letters, digits, '.', '_' and '-' (it becomes a folder under the root)")
    out = root / name
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another name")
    out.mkdir(parents=True)
    cmd = [sys.executable, "-c", "import sys; from leantune.cli.main import main; sys.exit(main())",
           "train", str(config), "--output_dir", str(out), "--train.progress", "false"]
    with open(out / "train.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return {"id": name, "pid": proc.pid, "log": str(out / "train.log")}


def serve_commands(root: Path) -> list[str]:
    """The `leantune serve` line that serves the finished runs under `root`, one per base model they share."""
    import shlex

    bases: dict[str, int] = {}
    if root.is_dir():
        for r in runs_mod.find_runs(root):
            row = runs_mod.run_row(root, r)
            if row.get("model") and (r / "adapter").is_dir():
                bases[row["model"]] = bases.get(row["model"], 0) + 1
    models = sorted(bases, key=lambda m: -bases[m]) or ["MODEL"]
    return [f"leantune serve {shlex.quote(m)} --adapters {shlex.quote(str(root))} --port 8000" for m in models]


def _base_url(url: str) -> str:
    url = str(url or "").strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"server {url!r} is not a URL; e.g. http://127.0.0.1:8000 (where `leantune serve` listens)")
    return url[:-3] if url.endswith("/v1") else url


def _proxy_routes(app: FastAPI, root: Path, serve_url: str | None, api_key: str | None, allow_set: bool) -> None:
    import httpx
    from starlette.background import BackgroundTask
    from starlette.responses import StreamingResponse

    target = {"base": _base_url(serve_url) if serve_url else None, "key": api_key or None}
    client = httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=600.0))

    @app.get("/api/chat")
    def api_chat():
        return {"server": target["base"], "commands": serve_commands(root), "can_set": allow_set}

    @app.post("/api/chat")
    async def api_chat_set(request: Request):
        """The page's "Connect" form: {server, api_key}. The key stays in this process, never echoed back."""
        if not allow_set:
            return _bad("setting the chat server from the page is off: this page listens beyond this machine "
                        "(--host); start it with --serve URL", 403)
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _bad("the request body must be a JSON object: {\"server\": \"http://127.0.0.1:8000\", \"api_key\": ...}")
        target["base"], target["key"] = _base_url(body.get("server")), str(body.get("api_key") or "") or None
        return {"server": target["base"], "commands": serve_commands(root), "can_set": allow_set}

    @app.api_route("/v1/{path:path}", methods=["GET", "POST"])
    async def proxy(path: str, request: Request):
        base = target["base"]
        if base is None:
            cmd = serve_commands(root)[0]
            return _bad(f"no server to chat with: start one (`{cmd}`), then `leantune ui --serve "
                        f"http://127.0.0.1:8000`", 503)
        headers = {"content-type": request.headers.get("content-type", "application/json"),
                   "accept": request.headers.get("accept", "*/*")}
        if target["key"]:
            headers["authorization"] = f"Bearer {target['key']}"
        req = client.build_request(request.method, f"{base}/v1/{path}", params=request.query_params,
                                   headers=headers, content=await request.body())
        try:
            upstream = await client.send(req, stream=True)
        except httpx.HTTPError as e:
            return _bad(f"cannot reach the server at {base} ({type(e).__name__}); is `leantune serve` running?", 502)
        keep = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "cache-control")}
        return StreamingResponse(upstream.aiter_raw(), status_code=upstream.status_code, headers=keep,
                                 background=BackgroundTask(upstream.aclose))

    app.router.on_shutdown.append(client.aclose)


def create_app(root: str | Path = "runs", allow_start: bool = True, serve_url: str | None = None,
               api_key: str | None = None) -> FastAPI:
    root = Path(root)
    app = FastAPI(title="leantune", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(LeantuneError)
    async def _one_line(request: Request, exc: LeantuneError):  # noqa: ARG001 - FastAPI's signature
        return _bad(str(exc))

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/api/guide")
    def api_guide():
        return guide()

    @app.get("/api/gpus")
    def api_gpus():
        from ..plan import GPUS

        return [{"name": d.name, "memory_bytes": d.memory, "tflops": d.tflops} for d in GPUS.values()]

    @app.post("/api/plan")
    async def api_plan(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return _bad("the request body is not JSON; send {\"model\": ..., \"gpu\": ..., \"seq\": ..., \"batch\": ...}")
        if not isinstance(body, dict):
            return _bad("the request body must be a JSON object with model, gpu, seq, batch, method")
        try:
            return plan_request(body)
        except LeantuneError as e:
            return _bad(str(e))
        except Exception as e:  # noqa: BLE001 - a page shows one line, not a traceback
            return _bad(f"could not plan {body.get('model')!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    @app.get("/api/runs")
    def api_runs():
        if not root.is_dir():
            return {"root": str(root), "runs": [], "note": f"{root} does not exist yet; train with --output_dir {root}/NAME"}
        return {"root": str(root), "runs": [runs_mod.run_row(root, r) for r in runs_mod.find_runs(root)]}

    @app.post("/api/runs/start")
    async def api_start(request: Request):
        if not allow_start:
            return _bad("starting runs is off: this page listens beyond this machine (--host); start runs with "
                        "leantune train", 403)
        try:
            body = await request.json()
        except ValueError:
            return _bad("the request body is not JSON; send {\"config\": \"my.yaml\", \"name\": \"first\"}")
        if not isinstance(body, dict):
            return _bad("the request body must be a JSON object with config and name")
        return start_run(root, body)

    @app.get("/api/runs/{run_id:path}")
    def api_run(run_id: str):
        try:
            path = runs_mod.resolve(root, run_id)
        except LeantuneError as e:
            return _bad(str(e), 404)
        return runs_mod.run_detail(root, path)

    _proxy_routes(app, root, serve_url, api_key, allow_set=allow_start)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
