"""`leantune serve` against its targets (issue 13), ratios from one run on one machine.

  throughput   decode tokens/s of a batch whose 8 rows use 8 distinct adapters vs the same batch on the base
               alone (target >= 0.85x); the engine stepped directly, no HTTP. Printed per wall second and per
               CPU second (less skewed by other work on the machine), with `bytes_bound`: the ratio a decode step
               bound by reading weights from memory cannot beat (base matrices / base + resident factors)
  load         500 requests from 50 concurrent clients over 8 adapters through the live HTTP server:
               errors, p50/p99 latency, tokens/s
  sequential   the batched server's tokens/s vs the same requests one at a time through `generate`
               (transformers' generate with the adapter attached, as `leantune generate` runs)
  swap         time to read an adapter from disk into a slot, per rank
  table        the throughput ratio for each row of --rows: targets (qv = PEFT's Llama default q_proj, v_proj;
               all = the 7 linears), rank, batch (8 = one row per adapter; 32 = four), base (fp32, or nf4: the
               base held in 4 bits through bitsandbytes, as `serve --quant-bits 4` holds it), each row in one run

    python benchmarks/bench_serve.py --model tiny                 # a random 4-layer Llama, seconds
    python benchmarks/bench_serve.py --model smollm2 --requests 100 --clients 20   # the real SmolLM2-135M
    python benchmarks/bench_serve.py --model smollm2 --only table --threads 1      # docs/serve.md's table

Adapters: PEFT-saved, random factors, r16 (swap: r8-r64) on every linear layer of the decoder.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import socket
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TARGET_SETS = {"qv": ["q_proj", "v_proj"], "all": list(TARGETS)}
TABLE_ROWS = "qv:8:8:fp32,qv:16:8:fp32,all:8:8:fp32,all:16:8:fp32,qv:8:32:fp32,qv:16:32:fp32,all:8:32:fp32,"\
             "all:16:32:fp32,qv:16:8:nf4,all:16:8:nf4"


def make_base(kind: str, work: Path):
    from transformers import AutoModelForCausalLM

    if kind == "tiny":
        from conftest import build_llama, build_tokenizer

        tok = build_tokenizer()
        tok.save_pretrained(work / "base")
        build_llama(work / "base", vocab_size=len(tok), layers=4, hidden=256)
        return str(work / "base"), AutoModelForCausalLM.from_pretrained(work / "base", dtype=torch.float32), tok
    from leantune.models.demo_model import smollm2_gguf_path
    from leantune.models.load import load_model, load_tokenizer

    src = str(smollm2_gguf_path()) if kind == "smollm2" else kind
    return src, load_model(src, dtype=torch.float32, device="cpu"), load_tokenizer(src)


def make_adapters(base, work: Path, ranks: list[int], targets: list[str] | None = None) -> list[Path]:
    """PEFT-saved adapters with random factors, one per rank; `base` is left as it was (PEFT unloaded)."""
    from peft import LoraConfig, get_peft_model

    out = []
    for i, r in enumerate(ranks):
        torch.manual_seed(i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            m = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets or TARGETS))
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.02)
        m.save_pretrained(work / f"ad{i}-r{r}")
        m.unload()
        out.append(work / f"ad{i}-r{r}")
    return out


def decode_rate(engine, prompts, adapters, tokens: int) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of the decode steps alone (prefill excluded) for one
    batch run to `tokens` each. CPU seconds count this process only, so other work on the machine skews them less."""
    from leantune.serve.engine import Request, Sampling

    for p, a in zip(prompts, adapters):
        engine.submit(Request(p, a, Sampling(max_tokens=tokens), lambda *_: None))
    engine.step()                        # admit + prefill + the first decode
    t0, c0, steps = time.perf_counter(), time.process_time(), 0
    while engine.busy():
        engine.step()
        steps += 1
    n = steps * len(prompts)
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def throughput(base, tok, folders, tokens: int, repeats: int, batch: int = 8) -> dict:
    """8 distinct adapters over `batch` rows (row i uses adapter i % 8) vs the same rows on the base alone."""
    from leantune.serve.engine import Engine

    engine = Engine(base, tok, max_loras=8, max_batch=batch)
    engine.eos = set()
    names = []
    for i, f in enumerate(folders[:8]):
        engine.add_adapter(f"a{i}", f)
        names.append(f"a{i}")
    prompts = [tok(f"the quick brown fox number {i}")["input_ids"] for i in range(batch)]
    rows = [names[i % len(names)] for i in range(batch)]
    decode_rate(engine, prompts, rows, 4)   # warm-up, and every adapter resident
    base_r, mixed_r = [], []
    for _ in range(repeats):                 # interleaved, so load changes on the machine hit both
        base_r.append(decode_rate(engine, prompts, [None] * batch, tokens))
        mixed_r.append(decode_rate(engine, prompts, rows, tokens))
    b, m = statistics.median(r[0] for r in base_r), statistics.median(r[0] for r in mixed_r)
    bc, mc = statistics.median(r[1] for r in base_r), statistics.median(r[1] for r in mixed_r)
    return {"base_tok_s": round(b, 1), "mixed8_tok_s": round(m, 1), "ratio": round(m / b, 3),
            "base_tok_per_cpu_s": round(bc, 1), "mixed8_tok_per_cpu_s": round(mc, 1), "cpu_ratio": round(mc / bc, 3),
            "bytes_bound": round(bytes_bound(engine), 3)}


def bytes_bound(engine) -> float:
    """The ratio a decode step cannot beat when it is bound by reading weights from memory (small batches on
    a CPU): the bytes of the base's matrices over those plus every resident slot's factors, all read per step."""
    from leantune.quant import is_quantized, storage_bits
    from leantune.serve.batched_lora import BatchedLoraLinear

    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    base = sum(storage_bits(m)[0] // 8 if is_quantized(m) else size(m.weight) for m in engine.model.modules()
               if isinstance(m, torch.nn.Linear) and not isinstance(m, BatchedLoraLinear))
    lora = sum(size(m.A) + size(m.B) for m in engine.model.modules() if isinstance(m, BatchedLoraLinear))
    return base / (base + lora)


def table(src: str, base, tok, work: Path, rows: str, tokens: int, repeats: int) -> None:
    """One throughput run per row (targets:rank:batch:base), printed as it finishes."""
    from leantune.config import QuantConfig
    from leantune.models.load import load_model

    quantized = {}
    for row in rows.split(","):
        targets, rank, batch, held = row.split(":")
        folders = make_adapters(base, work / row.replace(":", "-"), [int(rank)] * 8, TARGET_SETS[targets])
        if held == "fp32":
            model = copy.deepcopy(base)
        else:   # the base quantized by leantune's loader, as `leantune serve --quant-bits 4` holds it
            if held not in quantized:
                quantized[held] = load_model(src, dtype=torch.float32, device="cpu",
                                             quant=QuantConfig(bits=4, type=held, compute_dtype="fp32"))
            model = copy.deepcopy(quantized[held])
        model.eval().requires_grad_(False)
        result = throughput(model, tok, folders, tokens, repeats, batch=int(batch))
        print(f"table {targets} r{rank} batch {batch} base {held}: {result}", flush=True)
        del model


def swap_times(base, tok, work: Path, ranks: list[int]) -> dict:
    from leantune.serve.engine import Engine

    folders = make_adapters(base, work / "swap", ranks)
    engine = Engine(base, tok, max_loras=1, max_cpu_loras=1)
    out = {}
    for r, f in zip(ranks, folders):
        engine.add_adapter(f"r{r}", f)
    for r in ranks:
        engine.cpu.clear()                   # from disk, as after an eviction from the CPU cache
        engine.slots[0] = None
        t0 = time.perf_counter()
        engine._load_slot(0, f"r{r}")
        out[f"r{r}_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return out


def load_test(base, tok, folders, requests: int, clients: int, tokens: int) -> dict:
    import httpx
    import uvicorn

    from leantune.serve.api import Limits, build_app
    from leantune.serve.engine import Engine

    engine = Engine(base, tok, max_loras=8, max_batch=clients)
    for i, f in enumerate(folders[:8]):
        engine.add_adapter(f"a{i}", f)
    app = build_app(engine, "base", limits=Limits(max_tokens=tokens, max_concurrent=clients * 2))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    threading.Thread(target=srv.run, daemon=True).start()
    engine.start()
    while not srv.started:
        time.sleep(0.05)
    latencies, errors, generated = [], [], [0]
    todo = list(range(requests))

    async def client(http):
        while todo:
            i = todo.pop()
            body = {"model": f"a{i % 8}", "prompt": f"request {i}: the quick brown fox", "max_tokens": tokens,
                    "temperature": 0.7, "seed": i}
            t0 = time.perf_counter()
            try:
                r = await http.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600)
                r.raise_for_status()
                generated[0] += r.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - t0)
            except Exception as e:  # counted, not fatal: the figure is the error count
                errors.append(repr(e)[:200])

    async def main():
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as http:
            await asyncio.gather(*(client(http) for _ in range(clients)))

    t0 = time.perf_counter()
    asyncio.run(main())
    wall = time.perf_counter() - t0
    srv.should_exit = True
    engine.stop()
    latencies.sort()
    q = lambda f: round(latencies[min(len(latencies) - 1, int(f * len(latencies)))], 3) if latencies else None  # noqa: E731
    return {"requests": requests, "clients": clients, "errors": len(errors), "first_error": errors[:1],
            "p50_s": q(0.5), "p99_s": q(0.99), "tok_s": round(generated[0] / wall, 1), "wall_s": round(wall, 1)}


def sequential(base, tok, folders, n: int, tokens: int) -> dict:
    """The same kind of requests one at a time through transformers' generate with the adapter attached."""
    from leantune.checkpoint.adapter_io import load_adapter

    models = []
    for f in folders[:8]:
        m = copy.deepcopy(base)
        load_adapter(m, f)
        models.append(m.eval())
    generated, t0 = 0, time.perf_counter()
    for i in range(n):
        ids = torch.tensor([tok(f"request {i}: the quick brown fox")["input_ids"]])
        with torch.no_grad():
            out = models[i % 8].generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                         do_sample=True, temperature=0.7, pad_token_id=tok.pad_token_id or 0)
        generated += out.shape[1] - ids.shape[1]
    return {"requests": n, "tok_s": round(generated / (time.perf_counter() - t0), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | a model folder")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per request")
    ap.add_argument("--requests", type=int, default=500)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--sequential", type=int, default=24, help="requests for the one-at-a-time baseline")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", default="throughput,swap,load,sequential", help="any of throughput, swap, load, "
                    "sequential, table")
    ap.add_argument("--rows", default=TABLE_ROWS, help="table rows, targets:rank:batch:base (targets qv or all; "
                    "base fp32 or nf4/fp4)")
    ap.add_argument("--targets", default=",".join(TARGETS), help="modules the adapters adapt (default: every linear)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    TARGETS[:] = args.targets.split(",")
    warnings.filterwarnings("ignore")
    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory() as d:
        work = Path(d)
        src, base, tok = make_base(args.model, work)
        base.eval().requires_grad_(False)
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        if "table" in only:
            print(f"model {args.model}, torch threads {torch.get_num_threads()}, {args.tokens} tokens, "
                  f"{args.repeats} interleaved repeats per row", flush=True)
            table(src, base, tok, work, args.rows, args.tokens, args.repeats)
            only.discard("table")
            if not only:
                return
        folders = make_adapters(base, work, [16] * 8)
        print(f"model {args.model} ({sum(p.numel() for p in base.parameters()) / 1e6:.1f}M params), "
              f"8 adapters r16 on {len(TARGETS)} linears, torch threads {torch.get_num_threads()}", flush=True)
        if "throughput" in only:
            print("throughput", throughput(copy.deepcopy(base), tok, folders, args.tokens, args.repeats), flush=True)
        if "swap" in only:
            print("swap", swap_times(copy.deepcopy(base), tok, work, [8, 16, 32, 64]), flush=True)
        if "load" in only:
            load = load_test(copy.deepcopy(base), tok, folders, args.requests, args.clients, args.tokens)
            print("load", load, flush=True)
        if "sequential" in only:
            seq = sequential(base, tok, folders, args.sequential, args.tokens)
            print("sequential", seq, flush=True)
            if "load" in only:
                print(f"batched server / one at a time: {load['tok_s'] / seq['tok_s']:.2f}x", flush=True)


if __name__ == "__main__":
    main()
