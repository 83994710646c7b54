"""`leantune generate`: its options; the prompt and chat loop live in cli/chat.py (it imports torch)."""

from __future__ import annotations

import argparse
import math


def _bounded(kind, low: float, high: float | None = None, low_open: bool = False):
    """An argparse type: `kind(text)` within [low, high] (or (low, high] when low_open), else a usage error that
    names the range, before any model loads."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if not math.isfinite(value) or (value <= low if low_open else value < low) or (high is not None and value > high):
            span = f"{'>' if low_open else '>='} {low:g}" if high is None else \
                f"in {'(' if low_open else '['}{low:g}, {high:g}]"
            raise argparse.ArgumentTypeError(f"must be {span}, got {text}")
        return value
    return parse


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate with a base model plus an adapter (a prompt or a chat)",
                       description="Generate text from a run folder, an adapter folder or a plain model.",
                       epilog="examples:\n  leantune generate runs/first --prompt 'What is LoRA?'\n"
                       "  leantune generate runs/first --chat          # interactive chat\n"
                       "  leantune generate runs/first --no-adapter --prompt 'Hi'   # the base model alone",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a run folder (uses its adapter/), an adapter folder, or a model")
    p.add_argument("--base", help="base model, when it differs from the one recorded in the adapter")
    p.add_argument("--prompt", action="append", help="a user message (repeat for several prompts)")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat (type /exit to leave)")
    p.add_argument("--raw", action="store_true", help="send the prompt as plain text, without the chat template")
    p.add_argument("--system", help="system message for the chat template")
    p.add_argument("--no-adapter", action="store_true", help="ignore the adapter: the base model alone")
    p.add_argument("--max-new-tokens", type=_bounded(int, 1), default=128, help="tokens to generate (default: 128)")
    p.add_argument("--temperature", type=_bounded(float, 0), default=0.0, help="0 means greedy (default: 0)")
    p.add_argument("--top-p", type=_bounded(float, 0, 1, low_open=True), default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens whose probability reaches this, in (0, 1] "
                   "(default: 1.0)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="base weights dtype (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--quant-bits", type=int, choices=[4, 8], default=None,
                   help="quantize the base to 4 or 8 bits (default: as the run that trained the adapter)")


def _generate(ns: argparse.Namespace) -> int:
    from .chat import main as generate_main

    return generate_main(ns)
