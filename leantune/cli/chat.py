"""`leantune generate`: one-shot prompts, or an interactive chat with --chat, through `infer.generate`."""

from __future__ import annotations

import sys

import torch
from transformers import TextStreamer

from ..errors import ModelError
from ..infer.generate import generate_text, load_for_inference, run_system_prompt


def main(ns) -> int:
    torch.manual_seed(ns.seed)
    model, tok = load_for_inference(ns.source, base=ns.base, dtype=ns.dtype, use_adapter=not ns.no_adapter,
                                    quant_bits=getattr(ns, "quant_bits", None))
    system_text = ns.system or (None if ns.no_adapter else run_system_prompt(ns.source))
    system = [{"role": "system", "content": system_text}] if system_text else []
    opts = dict(raw=ns.raw, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p)
    if not ns.chat:
        if not ns.prompt:
            raise ModelError("nothing to generate: pass --prompt TEXT (repeatable) or --chat")
        for prompt in ns.prompt:
            reply = generate_text(model, tok, system + [{"role": "user", "content": prompt}], **opts)
            print(f"> {prompt}\n{reply}\n" if len(ns.prompt) > 1 else reply)
        return 0
    history = list(system)
    print("chat: type a message; /reset clears the history, /exit leaves.", file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = list(system)
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("model> ", end="", flush=True)
        reply = generate_text(model, tok, history, streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True),
                              **opts)
        history.append({"role": "assistant", "content": reply})
    return 0
