"""`leantune demo`: fine-tune the built-in small model on this machine, offline."""

from __future__ import annotations

import argparse


def _at_least_one(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:  # 0 read as 'unset' and ran the whole demo; a negative count failed minutes in
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="fine-tune the built-in small real model on this machine (offline, CPU)",
                       description="Fine-tunes a LoRA on SmolLM2-135M-Instruct with the built-in dataset and "
                       "prints the same prompts before and after. Needs no network.")
    p.add_argument("--output-dir", default="runs/demo", help="run folder (default: runs/demo); an earlier demo run "
                   "there is replaced, any other folder is refused")
    p.add_argument("--steps", type=_at_least_one, default=None,
                   help="optimizer steps (default: the demo's tuned value)")
    p.add_argument("--layers", type=_at_least_one, default=None,
                   help="keep only the first N layers (fast smoke runs)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _demo(ns: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(output_dir=ns.output_dir, steps=ns.steps, layers=ns.layers, quiet=ns.quiet)
