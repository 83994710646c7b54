"""Start the page: check the port first (a taken port is one line and exit 2, not uvicorn's traceback),
then serve the app with uvicorn on 127.0.0.1 unless --host says otherwise."""

from __future__ import annotations

import socket
from pathlib import Path

from ..errors import ConfigError


def check_port(host: str, port: int) -> None:
    """Refuse a port out of range or one another process listens on, naming the fix."""
    if not 0 < port < 65536:
        raise ConfigError(f"--port must be 1-65535, got {port}; e.g. --port 7860")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); "
                              f"another program uses it: pass --port {port + 1} (or another free port)") from None


def serve(root: str | Path = "runs", host: str = "127.0.0.1", port: int = 7860, quiet: bool = False,
          serve_url: str | None = None, api_key: str | None = None) -> int:
    import uvicorn

    from .app import create_app

    check_port(host, port)
    local = host in ("127.0.0.1", "localhost", "::1")
    if serve_url and not serve_url.strip().startswith(("http://", "https://")):
        raise ConfigError(f"--serve {serve_url!r} is not a URL; e.g. --serve http://127.0.0.1:8000")
    app = create_app(root, allow_start=local, serve_url=serve_url, api_key=api_key)  # the page can start runs only when no one else can reach it
    print(f"leantune ui: http://{host}:{port}/  (runs under {Path(root).resolve()}; Ctrl-C stops)", flush=True)
    if not local:
        print(f"note: listening on {host}: anyone who can reach this machine can read the runs "
              "(starting runs from the page is off)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning" if quiet else "info", access_log=not quiet)
    return 0
