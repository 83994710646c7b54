"""`leantune plan`: predicted memory and step time of every method before training."""

from __future__ import annotations

import argparse


EPILOG_PLAN = """\
examples:
  leantune plan meta-llama/Llama-3.1-8B --gpu 24GB --seq 2048 --batch 4   # a hub id: reads config.json only
  leantune plan ./Qwen2.5-7B --gpu "RTX 4090"       # a local folder (or its config.json)
  leantune plan my.yaml                               # the config you would train, on this machine
  leantune plan my.yaml --fit --gpu "RTX 4090"        # plus the train flags that make it fit
  leantune plan my.yaml --json                        # the same table, machine-readable

reading the table: peak is the most memory a training step holds (torch's max_memory_allocated on a GPU,
the process's resident set on a CPU); "ok" means it fits with 1 GiB left for the CUDA context. The
breakdown and the error of each prediction against measured runs are in docs/plan.md.
"""


def _add_plan(sub) -> None:
    p = sub.add_parser("plan", help="predict peak memory and step time of every method before training; recommend one that fits",
                       description="Plans a fine-tuning run from the model's config.json alone (no weights): for each "
                       "method, the predicted peak memory with and without gradient checkpointing, a breakdown, the "
                       "peaks outside the step (eval, save, merge, export) and a step time from FLOPs; then the "
                       "cheapest configuration that fits the device. Error against measured runs: docs/plan.md.",
                       epilog=EPILOG_PLAN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a model folder, its config.json, a hub id (reads config.json only), a .gguf file, "
                   "`demo`, or a leantune YAML config (its model, method, quant, data.max_length and train.* are used)")
    p.add_argument("--gpu", help="a card by name ('RTX 4090', H100, 'A100 40GB') or a memory size (24GB); "
                   "default: this machine's GPU, else its CPU and RAM")
    p.add_argument("--seq", type=int, help="tokens per row (default: data.max_length of the config, else 1024)")
    p.add_argument("--batch", type=int, help="rows per micro-batch (default: train.batch_size, else 4)")
    p.add_argument("--method", choices=["lora", "dora", "ia3", "bottleneck", "prompt", "prefix", "full", "freeze"],
                   help="the method to recommend a configuration for (default: the config's, else lora)")
    p.add_argument("--tflops", type=float, help="the device's matmul TFLOP/s, for the step time (default: the GPU "
                   "table, or a quick matmul probe on a CPU)")
    p.add_argument("--fit", action="store_true", help="also print the train flags (batch, accumulation, "
                   "checkpointing, optimizer, quant) of the recommended configuration")
    p.add_argument("--json", action="store_true", help="the same plan as JSON")


def _plan(ns: argparse.Namespace) -> int:
    import json

    from ..plan import make_plan, render

    plan = make_plan(ns.source, gpu=ns.gpu, seq=ns.seq, batch=ns.batch, method=ns.method, tflops=ns.tflops)
    print(json.dumps(plan.as_dict(), indent=1) if ns.json else render(plan, fit=ns.fit, source=ns.source))
    return 0
