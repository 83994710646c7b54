"""GPU side by side: leantune against Transformers Trainer + PEFT (+ bitsandbytes), the rows of issue 17.

This reproduces the shared harness (`../shared/bench/bench_gpu.py`) inside the repository, so that it
travels to a lent GPU with the code: a random-init Llama of a given shape, both sides on the same
fixed-length rows (batch x seq real tokens: no padding, no packing), LoRA r16 a32 on all linear layers,
bf16 base, AdamW 2e-4 cosine (QLoRA: nf4 + double quant, paged_adamw_8bit). Each side runs in its own
process; step time = median gap between step ends after the warm-up steps, read inside the process
(Trainer: a callback after torch.cuda.synchronize(); leantune: metrics.jsonl, whose per-step loss read
synchronizes); peak = torch.cuda.max_memory_allocated of that process. Ratios come from one run.

    python benchmarks/bench_gpu.py table --rows 1b:lora,1b:lora:gc,1b:qlora:gc,3b:lora,3b:qlora:gc \\
        --work /tmp/bench --steps 10 --warmup 2 --row-timeout 150 --deadline 330 --json $OUT/bench.jsonl
    python benchmarks/bench_gpu.py fixture --out /tmp/fx --size 1b          # the pieces, one at a time
    python benchmarks/bench_gpu.py peer --fx /tmp/fx --mode qlora --gc
    python benchmarks/bench_gpu.py ours --fx /tmp/fx --mode qlora --gc --compile
    python benchmarks/bench_gpu.py ours --fx /tmp/fx --mode lora --compile --steps 6 --profile 30

A row is size:mode[:gc][:compile][:triton][:offload]; sizes 1b (TinyLlama-1.1B's shape, batch 8 x 1024) and 3b (Llama-3.2-3B's shape,
128k vocabulary, batch 4 x 1024), plus tiny for a smoke test. The table prints as markdown, the speed
ratio being leantune's tokens/s over the peer's (>1: faster) and the memory ratio leantune's peak over
the peer's (<1: smaller).

`:compile` runs leantune with `train.compile true` (each decoder layer through torch.compile) against the
peer's time of the same row without it (measured once per table). The compile is paid in the first step,
which the warm-up skips; `first_step_s` (first step end minus the moment the optimizer was built) shows
it, and the table's compile column is that time minus the plain row's `first_step_s`. `:triton` runs leantune with `train.kernels triton` (the fused
cross-entropy, RMSNorm and SwiGLU kernels of leantune/ops/triton/), `:offload` with `train.checkpoint_offload
true` (each checkpointed layer's input in pinned host memory; with :gc): like :compile, against the peer's time of
the row without these tags, so each shows on/off next to its plain row. `--profile N` runs
leantune under torch.profiler from step 2 on (the compile stays out) and prints the top N ops by self
CUDA time.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

SIZES = {  # hidden, layers, heads, kv_heads, intermediate, vocab, batch
    "tiny": (128, 2, 4, 2, 344, 1024, 2),
    "1b": (2048, 22, 32, 4, 5632, 32000, 8),
    "3b": (3072, 28, 24, 8, 8192, 128256, 4),
}
NAMES = {"1b": "1.1B (TinyLlama shape)", "3b": "3.2B (Llama-3.2-3B shape, 128k vocab)", "tiny": "tiny"}
SEQ = 1024


def fixture(a) -> None:
    """A saved random-init bf16 Llama of `size` with a word-level tokenizer, and texts longer than SEQ."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    h, layers, heads, kv, inter, vocab, _ = SIZES[a.size]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = [f"w{i}" for i in range(min(4000, vocab - 4))]
    with open(out / "data.jsonl", "w") as f:
        for _ in range(a.examples):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(a.seq + 64))}) + "\n")
    vocab_map = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.save_pretrained(out / "model")
    cfg = LlamaConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      intermediate_size=inter, vocab_size=vocab, max_position_embeddings=8192, bos_token_id=1,
                      eos_token_id=2, pad_token_id=3, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out / "model", safe_serialization=True)
    print(json.dumps({"model": str(out / "model"), "params": sum(p.numel() for p in model.parameters())}))


def _rows(fx: Path, seq: int, n: int) -> list[dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(fx / "model")
    texts = [json.loads(line)["text"] for line in open(fx / "data.jsonl")][:n]
    out = []
    for t in texts:
        ids = tok(t, truncation=True, max_length=seq)["input_ids"]
        assert len(ids) == seq, len(ids)  # every row full: no padding on either side
        out.append({"input_ids": ids, "labels": ids, "attention_mask": [1] * seq})
    return out


def peer(a) -> None:
    """Trainer(bf16=True) + PEFT; for QLoRA bitsandbytes nf4 + double quant and prepare_model_for_kbit_training."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, Trainer, TrainerCallback, TrainingArguments,
                              default_data_collator)

    kw = {"dtype": torch.bfloat16, "attn_implementation": "sdpa"}
    if a.mode == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                       bnb_4bit_use_double_quant=True,
                                                       bnb_4bit_compute_dtype=torch.bfloat16)
        kw["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(Path(a.fx) / "model", **kw)
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=a.gc) if a.mode == "qlora" else model.cuda()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0,
                                             bias="none", task_type="CAUSAL_LM"))
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            ends.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(Path(a.fx) / "peer-out"), per_device_train_batch_size=a.batch,
                             max_steps=a.steps, learning_rate=2e-4, lr_scheduler_type="cosine", warmup_steps=1,
                             logging_steps=1000, save_strategy="no", report_to=[], bf16=True,
                             gradient_checkpointing=a.gc, gradient_checkpointing_kwargs={"use_reentrant": False},
                             optim="paged_adamw_8bit" if a.mode == "qlora" else "adamw_torch",
                             dataloader_num_workers=0, disable_tqdm=True, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=_rows(Path(a.fx), a.seq, a.batch * a.steps),
                      data_collator=default_data_collator, callbacks=[Clock()])
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    _report("peer", a, ends, torch.cuda.max_memory_allocated())


def _ours_argv(a, out: Path) -> list[str]:
    fx = Path(a.fx)
    argv = ["train", "--model", str(fx / "model"), "--data.path", str(fx / "data.jsonl"), "--data.format", "text",
            "--data.max_length", str(a.seq), "--data.packing", "false", "--data.eval_fraction", "0",
            "--lora.rank", "16", "--lora.alpha", "32", "--train.batch_size", str(a.batch), "--train.lr", "2e-4",
            "--train.max_steps", str(a.steps), "--train.warmup_steps", "1", "--train.save_every", "0",
            "--train.progress", "false", "--train.tensorboard", "false", "--train.log_every", "1",
            "--train.gradient_checkpointing", str(a.gc).lower(), "--train.compile", str(a.compile).lower(),
            "--output_dir", str(out)]
    if a.triton:
        argv += ["--train.kernels", "triton"]
    if a.offload:
        argv += ["--train.checkpoint_offload", "true"]
    if a.mode == "qlora":
        argv += ["--quant.bits", "4", "--train.optimizer", "paged_adamw_8bit"]
    return argv


def ours(a) -> None:
    """The leantune CLI in this process (optionally under the profiler); step ends and the CUDA peak read
    back from metrics.jsonl."""
    import torch

    from leantune.cli.main import main
    try:  # where the loop builds its optimizer: the split loop's train/setup.py, else the loop itself
        from leantune.train import setup as loop
    except ImportError:
        from leantune.train import loop
    out = Path(a.fx) / f"lt-{a.mode}-{int(a.gc)}-{int(a.compile)}{int(a.triton)}{int(a.offload)}-{time.monotonic_ns()}"
    built: list[float] = []
    if hasattr(loop, "build_optimizer"):  # the last thing before the first step: time it from there
        build = loop.build_optimizer

        def timed_build(*args, **kw):
            opt = build(*args, **kw)
            built.append(time.time())
            return opt
        loop.build_optimizer = timed_build
    with _profiled(a):
        rc = main(_ours_argv(a, out))
    if rc:
        print(json.dumps({"side": "leantune", "mode": a.mode, "gc": a.gc, "error": f"leantune train exited {rc}"}))
        return
    recs = [json.loads(line) for line in open(out / "metrics.jsonl") if '"loss"' in line]
    peak = max(rec.get("peak_memory_mib", 0) for rec in recs) * 2**20
    extra = {"compile": a.compile, "triton": a.triton, "offload": a.offload, "tokens_per_s_logged": recs[-1].get("tokens_per_s"),
             "loss_first_last": [recs[0]["loss"], recs[-1]["loss"]]}
    if built:
        extra["first_step_s"] = round(recs[0]["time"] - built[0], 2)
    if a.compile:
        from torch._dynamo.utils import compilation_time_metrics as ct

        extra["dynamo_compile_s"] = round(sum(sum(v) for k, v in ct.items()
                                              if k.endswith("compile_inner") or "bw_compiler" in k), 2)
        extra["graph_breaks"] = sum(torch._dynamo.utils.counters["graph_break"].values())
        extra["unique_graphs"] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _report("leantune", a, [rec["time"] for rec in recs], peak, extra)


def _profiled(a):
    """torch.profiler from the second micro-batch on when --profile N (the first step, which holds the
    compile, stays out): prints the top N ops by self CUDA time."""
    import contextlib

    if not a.profile:
        return contextlib.nullcontext()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from leantune.train import step

    prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
    calls, loss_fn = [0], step.micro_batch_loss

    def counted(*args, **kw):  # the loop calls step.micro_batch_loss once per micro-batch
        calls[0] += 1
        if calls[0] == 2:
            prof.__enter__()
        return loss_fn(*args, **kw)

    @contextlib.contextmanager
    def run():
        step.micro_batch_loss = counted
        try:
            yield
        finally:
            step.micro_batch_loss = loss_fn
        if calls[0] < 2:
            print("=== profile: fewer than 2 micro-batches ran; nothing profiled")
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        prof.__exit__(None, None, None)
        ka = prof.key_averages()
        total, n = sum(e.self_device_time_total for e in ka) / 1e6, a.steps - 1
        print(f"=== leantune {a.mode} gc={a.gc} compile={a.compile}: total self CUDA time {total:.3f} s over "
              f"steps 2-{a.steps} ({total / n:.3f} s/step)")
        print(ka.table(sort_by="self_cuda_time_total", row_limit=a.profile, max_name_column_width=70))
    return run()


def _report(side: str, a, ends: list[float], peak: float, extra: dict | None = None) -> None:
    gaps = [b - x for x, b in zip(ends, ends[1:])][a.warmup:]
    step = statistics.median(gaps) if gaps else float("nan")
    print(json.dumps({"side": side, "mode": a.mode, "gc": a.gc, "batch": a.batch, "seq": a.seq,
                      "step_s": round(step, 4), "tokens_per_s": round(a.batch * a.seq / step, 1),
                      "peak_mib": round(peak / 2**20, 1), "n_gaps": len(gaps), **(extra or {})}), flush=True)


def table(a) -> None:
    """Every row: fixture once per size, then peer and leantune, each under a timeout and the deadline."""
    start, results = time.monotonic(), []
    work = Path(a.work)
    peers: dict[tuple, dict] = {}  # (size, mode, gc) -> the peer's result: a compiled row reuses its plain row's
    for spec in a.rows.split(","):
        size, mode, *rest = spec.split(":")
        gc, compiled, kernels, offload = "gc" in rest, "compile" in rest, "triton" in rest, "offload" in rest
        fx = work / f"fx-{size}"
        row = {"row": spec, "size": size, "mode": mode, "gc": gc, "compile": compiled, "triton": kernels,
               "offload": offload}
        for what in ("fixture", "peer", "ours"):
            left = a.deadline - (time.monotonic() - start)
            if what == "peer" and "step_s" in peers.get((size, mode, gc), {}):
                row[what] = peers[(size, mode, gc)]
                continue
            if left < 40:  # no 1.1B side loads and steps in less: a doomed start would only burn the budget
                row[what] = {"error": "skipped: out of time"}
                continue
            if what == "fixture":
                if (fx / "model" / "config.json").exists():
                    continue
                cmd = [sys.executable, __file__, "fixture", "--out", str(fx), "--size", size, "--seq", str(a.seq)]
            else:
                cmd = [sys.executable, __file__, what, "--fx", str(fx), "--mode", mode, "--steps", str(a.steps),
                       "--warmup", str(a.warmup), "--batch", str(SIZES[size][6]), "--seq", str(a.seq)]
                cmd += (["--gc"] if gc else []) + (["--compile"] if compiled and what == "ours" else [])
                cmd += (["--triton"] if kernels and what == "ours" else []) + (["--offload"] if offload and what == "ours" else [])
            row[what] = _run(cmd, min(a.row_timeout, left))
            if what == "peer":
                peers[(size, mode, gc)] = row[what]
            print(f"[{time.monotonic() - start:6.1f}s] {spec} {what}: {json.dumps(row[what])[:400]}", flush=True)
        results.append(row)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    _compile_times(results)
    print(markdown(results))


def _compile_times(results: list[dict]) -> None:
    """A compiled row's compile time: its first step less the plain row's first step (same size/mode/gc)."""
    plain = {(r["size"], r["mode"], r["gc"]): r["ours"] for r in results
             if not (r.get("compile") or r.get("triton") or r.get("offload"))}
    for r in results:
        first, ref = r["ours"].get("first_step_s"), plain.get((r["size"], r["mode"], r["gc"]), {}).get("first_step_s")
        if r.get("compile") and first is not None and ref is not None:
            r["ours"]["compile_s"] = round(first - ref, 1)


def _run(cmd: list[str], timeout: float) -> dict:
    t = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if lines and '"error"' in lines[-1]:  # `ours` reports a failed CLI run as a JSON line
        err = json.loads(lines[-1])
        tail = err["error"].strip().splitlines() or ["?"]
        return {"error": tail[-1][-300:], "stderr_tail": err["error"]}
    if r.returncode or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines() or ["no output"]
        return {"error": tail[-1][-300:], "rc": r.returncode, "stderr_tail": "\n".join(tail[-25:])[-3000:]}
    return {**json.loads(lines[-1]), "wall_s": round(time.monotonic() - t, 1)}


def markdown(results: list[dict]) -> str:
    head = ("| model, batch x seq | config | peer s/step | leantune s/step | speed vs peer | peer peak | "
            "leantune peak | memory vs peer |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in results:
        p, o = r.get("peer", {}), r.get("ours", {})
        config = {"lora": "LoRA", "qlora": "QLoRA nf4+dq, paged_adamw_8bit"}[r["mode"]] + (" + checkpointing" if r["gc"] else "")
        if r.get("compile"):
            config += f" + compile ({o['compile_s']} s)" if "compile_s" in o else " + compile"
        config += (" + triton kernels" if r.get("triton") else "") + (" + offloaded" if r.get("offload") else "")
        shape = f"{NAMES[r['size']]}, {SIZES[r['size']][6]} x {p.get('seq', o.get('seq', SEQ))}"
        if "step_s" in p and "step_s" in o:
            speed = f"**{p['step_s'] / o['step_s']:.2f}x**"
            mem = f"**{o['peak_mib'] / p['peak_mib']:.2f}x**"
        else:
            speed = mem = "n/a (" + "; ".join(f"{k}: {v['error'][:60]!r}" for k, v in (("peer", p), ("leantune", o))
                                                 if "error" in v) + ")"
        lines.append(f"| {shape} | {config} | {p.get('step_s', '-')} | {o.get('step_s', '-')} | {speed} | "
                     f"{_gb(p)} | {_gb(o)} | {mem} |")
    return "\n".join(lines)


def _gb(side: dict) -> str:
    return f"{side['peak_mib'] / 1024:.1f} GiB" if "peak_mib" in side else "-"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", choices=["fixture", "peer", "ours", "table"])
    ap.add_argument("--out")
    ap.add_argument("--fx")
    ap.add_argument("--size", default="1b", choices=list(SIZES))
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--mode", default="lora", choices=["lora", "qlora"])
    ap.add_argument("--gc", action="store_true")
    ap.add_argument("--compile", action="store_true", help="ours: train.compile true (each decoder layer compiled)")
    ap.add_argument("--triton", action="store_true", help="ours: train.kernels triton (fused CE, RMSNorm, SwiGLU)")
    ap.add_argument("--offload", action="store_true", help="ours: train.checkpoint_offload true (with --gc)")
    ap.add_argument("--profile", type=int, default=0, help="ours: profile the run and print the top N ops by CUDA time")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rows", default="1b:lora,1b:lora:gc,1b:qlora:gc,3b:lora,3b:qlora:gc")
    ap.add_argument("--work", default="/tmp/leantune-bench-gpu")
    ap.add_argument("--row-timeout", type=float, default=180, help="seconds for one side (or a fixture)")
    ap.add_argument("--deadline", type=float, default=1e9, help="seconds for the whole table; later pieces are skipped")
    ap.add_argument("--json", default=None, help="append each row as a JSON line here")
    args = ap.parse_args()
    {"fixture": fixture, "peer": peer, "ours": ours, "table": table}[args.what](args)
