"""`leantune ui`: its options; the local web page itself is leantune/ui/."""

from __future__ import annotations

import argparse


def _add_ui(sub) -> None:
    p = sub.add_parser("ui", help="open the local web page: the methods guide, the planner, your runs' live curves",
                       description="Serves one page on this machine (no internet, no CDN): a guide to the "
                       "fine-tuning and quantization techniques, the planner as a form with a chart per method, "
                       "and every run folder under --root with live loss curves, memory, data report and "
                       "checkpoints, two runs side by side. docs/ui.md tells more.",
                       epilog="examples:\n  leantune ui                      # runs under ./runs, http://127.0.0.1:7860/\n"
                       "  leantune ui --root ~/runs --port 8080\n"
                       "  leantune ui --serve http://127.0.0.1:8000 --api-key \"$KEY\"   # the Chat tab talks to leantune serve",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="runs", help="folder whose run folders the page lists (default: runs)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default: 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only; "
                   "0.0.0.0 shows your runs to the network)")
    p.add_argument("--quiet", action="store_true", help="no request log")
    p.add_argument("--serve", metavar="URL", help="a `leantune serve` server for the Chat tab, e.g. http://127.0.0.1:8000: "
                   "the page's /v1/* is proxied to it (without it, the tab shows the command that starts one)")
    p.add_argument("--api-key", help="the server's --api-key; added by the proxy, never sent to the browser")


def _ui(ns: argparse.Namespace) -> int:
    from ..ui.server import serve

    return serve(ns.root, host=ns.host, port=ns.port, quiet=ns.quiet, serve_url=ns.serve, api_key=ns.api_key)
