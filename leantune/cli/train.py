"""`leantune train`: its options (every config field) and the run, in this process or under torchrun."""

from __future__ import annotations

import argparse
import sys

from .options import _add_config_fields, _overrides


EPILOG_TRAIN = """\
examples:
  leantune train my.yaml                         # the whole run from one file
  leantune train my.yaml --lora.rank 8 --train.lr 1e-4
  leantune train --model ./my-model --data.path train.jsonl --output_dir runs/first
  leantune train runs/first/config.yaml --resume # continue after a crash or Ctrl-C
  leantune train my.yaml --nproc 2               # 2 processes on this machine (torchrun; docs/distributed.md)
  torchrun --nproc-per-node 4 -m leantune train my.yaml --distributed.strategy fsdp2

a minimal config file:
  model: ./SmolLM2-135M-Instruct        # local HF folder, hub id, or .gguf file
  output_dir: runs/first
  data: {path: train.jsonl}             # alpaca, chat messages, prompt/completion or text records
  lora: {rank: 16, alpha: 32}
  train: {epochs: 2, lr: 2.0e-4}
"""


def _add_train(sub) -> None:
    p = sub.add_parser("train", usage="leantune train [CONFIG] [--section.field VALUE ...] [--resume]", help="fine-tune a model from a YAML config (every field overridable here)",
                       description="Fine-tune a causal LM: LoRA (rsLoRA, LoRA+), DoRA, IA3, prompt or prefix tuning, "
                       "bottleneck adapters, full or freeze fine-tuning (method:), over a 16-bit or a 4/8-bit base "
                       "(quant.bits: QLoRA). Every config field can be set in the YAML file or overridden here as "
                       "--section.field VALUE.",
                       epilog=EPILOG_TRAIN, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file (optional when --model and --data.path are given)")
    p.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    p.add_argument("--max-steps", dest="cfg:train.max_steps", default=argparse.SUPPRESS, metavar="INT",
                   help="shorthand for --train.max_steps")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train in N processes on this machine: starts `torchrun --standalone --nproc-per-node N -m "
                   "leantune train ...` with the other arguments (each process trains train.batch_size rows per "
                   "micro-batch; see distributed.*). Several machines: run torchrun yourself (docs/distributed.md)")
    p.add_argument("--fit", dest="cfg:train.auto_fit", action="store_const", const=True, default=argparse.SUPPRESS,
                   help="shorthand for --train.auto_fit true: the planner sizes batch, accumulation and checkpointing "
                   "to this device's memory (or --train.fit_memory 6GB) before the run")
    _add_config_fields(p)


def _train(ns: argparse.Namespace, argv: list[str]) -> int:
    from .. import config as config_mod

    if ns.nproc is not None:
        return _spawn_torchrun(ns.nproc, argv)

    cfg = config_mod.load(ns.config, _overrides(ns))
    from ..plan.fit import prepare
    from ..train.loop import run

    fit = prepare(cfg, resume=ns.resume)  # train.auto_fit: sized by the planner before anything loads
    res = run(cfg, resume=ns.resume, fit=fit)
    return {"interrupted": 130, "terminated": 143}.get(res.stopped, 0)  # as io/faults.py EXIT_*


def _spawn_torchrun(nproc: int, argv: list[str]) -> int:
    """`--nproc N`: the same command under torchrun, N processes on this machine (a free port each time)."""
    import os
    import subprocess

    from ..errors import ConfigError

    if nproc < 1:
        raise ConfigError(f"--nproc must be >= 1, got {nproc}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--nproc inside a torchrun job would start torchrun again; drop --nproc")
    rest, skip = [], False
    for a in argv:  # the arguments less --nproc N / --nproc=N
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "leantune", *rest]
    print("running: torchrun " + " ".join(cmd[3:]), flush=True)
    return subprocess.call(cmd)
