"""`leantune generate`: its options; the prompt and chat loop live in cli/chat.py (it imports torch)."""

from __future__ import annotations

import argparse


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
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default: 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="base weights dtype (default: auto)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--quant-bits", type=int, choices=[4, 8], default=None,
                   help="quantize the base to 4 or 8 bits (default: as the run that trained the adapter)")


def _generate(ns: argparse.Namespace) -> int:
    from .chat import main as generate_main

    return generate_main(ns)
