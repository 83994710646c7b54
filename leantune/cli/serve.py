"""`leantune serve`: its options; the OpenAI-compatible server itself is leantune/serve/."""

from __future__ import annotations

import argparse


EPILOG_SERVE = """\
examples:
  leantune serve ./SmolLM2-135M --adapters runs/     # every finished run under runs/ is a model name
  leantune serve runs/legal runs/support --port 8000 --api-key "$KEY" --max-loras 8
  leantune serve ./model legal=runs/legal/adapter   # NAME=PATH names an adapter yourself
  leantune serve runs/qlora-run                     # a QLoRA run: served over its own 4-bit base
  leantune serve ./model --adapters runs/ --quant-bits 4 --quant-type nf4   # any base held in 4 bits
  curl localhost:8000/v1/chat/completions -H "Authorization: Bearer $KEY" \\
       -d '{"model": "legal", "messages": [{"role": "user", "content": "Hi"}], "stream": true}'

"model" in a request picks the adapter; the base's own name (as given, or --served-model-name) means none.
Any OpenAI client works: base_url=http://127.0.0.1:8000/v1. Routes, limits and metrics: docs/serve.md.
"""


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server: one base, many adapters, batched together",
                       description="Serve a base model and any number of LoRA/DoRA adapters over HTTP "
                       "(/v1/chat/completions, /v1/completions, /v1/models, /metrics). Requests for different "
                       "adapters run in one batch; adapters beyond --max-loras are swapped in from disk.",
                       epilog=EPILOG_SERVE, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="the base model, and/or run folders / adapter folders / NAME=PATH to serve by name")
    p.add_argument("--adapters", metavar="DIR", help="serve every finished run under DIR (by folder name); "
                   "/v1/load_lora_adapter loads only from inside DIR")
    p.add_argument("--base", help="the base model, when the adapters name another (or none)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every route but /health "
                   "(default: $LEANTUNE_API_KEY, else none)")
    p.add_argument("--max-loras", type=int, default=8, help="adapters resident at once, in one batch (default: 8)")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in CPU memory; beyond it they are read from disk again (default: --max-loras)")
    p.add_argument("--max-batch", type=int, default=32, help="sequences decoded together (default: 32)")
    p.add_argument("--max-tokens", type=int, default=1024, help="cap on a request's max_tokens (default: 1024)")
    p.add_argument("--max-concurrent", type=int, default=64, help="requests in flight before 429 (default: 64)")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="cap on a request body (default: 1 MiB)")
    p.add_argument("--served-model-name", help="the base's model name in requests (default: the base as given)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="base weights dtype (default: auto)")
    p.add_argument("--quant-bits", choices=["4", "8", "none"], default=None,
                   help="hold the base quantized through bitsandbytes, as QLoRA trains: 4 (NF4/FP4) or 8 (LLM.int8); "
                   "none: in --dtype (default: as the runs served trained over it, else none)")
    p.add_argument("--quant-type", choices=["nf4", "fp4"], default=None,
                   help="the 4-bit code (default: the run's quant.type, else nf4)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: auto)")
    p.add_argument("--engine", choices=["leantune", "vllm"], default="leantune",
                   help="leantune: serve here (default); vllm: print the `vllm serve` command for the same adapters "
                   "after checking them against vLLM's rules (exit 2 when it would refuse one)")
    p.add_argument("--print", action="store_true", help="with --engine vllm: print the command (what it always does)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default: warning)")


def _serve(ns: argparse.Namespace) -> int:
    from ..serve.server import serve

    return serve(ns)
