"""Generation with a base model plus an adapter: one-shot prompts or an interactive chat.

`find_model_and_adapter` turns what the user points at into (base model, adapter folder):
a run folder (its `adapter/`, its `model/` after full or freeze tuning, or its newest checkpoint while
a LoRA run is unfinished), an adapter
folder (its adapter_config.json names the base), or a plain model.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .errors import ModelError


def find_model_and_adapter(source: str, base: str | None = None) -> tuple[str, Path | None]:
    p = Path(source)
    if p.is_dir() and (p / "config.yaml").exists() and not (p / "config.json").exists():  # a run folder
        from .train.state import checkpoint_dirs

        if (p / "model").is_dir():  # method full/freeze: the run's output is a whole model
            return str(p / "model"), None
        if (p / "adapter").is_dir():
            p = p / "adapter"
        elif ckpts := checkpoint_dirs(p):
            if not (ckpts[-1] / "adapter_config.json").exists():
                raise ModelError(f"run folder {p} has no final model yet: full and freeze runs write one at the end; "
                                 f"resume it with `leantune train {p / 'config.yaml'} --resume`")
            print(f"note: {p} has no final adapter yet; using its newest checkpoint {ckpts[-1].name}", file=sys.stderr)
            p = ckpts[-1]
        else:
            raise ModelError(f"run folder {p} has no adapter and no checkpoint yet; train it first")
    if p.is_dir() and (p / "adapter_config.json").exists():
        from .checkpoint.peft_format import read_config

        model = base or read_config(p).get("base_model_name_or_path")
        if not model:
            raise ModelError(f"{p}/adapter_config.json names no base model; pass --base MODEL")
        return model, p
    return base or source, None


def run_quant(source: str, bits: int | None = None):
    """The `quant` section to load the base with: `bits` when given, else that of the run the source
    belongs to (a run folder, or its adapter/ or checkpoint folder), else none."""
    from .config import QuantConfig, load

    if bits is not None:
        return QuantConfig(bits=bits)
    p = Path(source).resolve()
    for folder in (p, *p.parents[:3]):
        if (folder / "config.yaml").is_file() and not (folder / "config.json").exists():
            return load(folder / "config.yaml", validate=False).quant
    return None


def load_for_inference(source: str, *, base: str | None = None, dtype: str = "auto", use_adapter: bool = True,
                       quant_bits: int | None = None, device: str = "auto"):
    """Return (model, tokenizer) ready for generation, the adapter attached (not merged), on `device`
    (auto: a GPU when torch sees one, else the CPU).

    The base is quantized as the run that trained the adapter had it (its config.yaml `quant`), or to
    `quant_bits` when given.
    """
    from .checkpoint.adapter_io import load_adapter
    from .models.load import load_model, load_tokenizer, pick_dtype, resolve_device

    model_src, adapter = find_model_and_adapter(source, base)
    device = resolve_device(device)
    tok = load_tokenizer(model_src)
    quant = run_quant(source, quant_bits) if Path(source).exists() or quant_bits else None
    model = load_model(model_src, dtype=pick_dtype(dtype, device), device=device, quant=quant)
    if getattr(model, "leantune_quant", None) is not None:
        print(f"note: generating with a {model.leantune_quant.bits}-bit base", file=sys.stderr)
    if adapter is not None and use_adapter:
        load_adapter(model, adapter)
        model.to(device)
    model.eval().requires_grad_(False)
    return model, tok


def build_prompt(tok, messages: list[dict], raw: bool) -> list[int]:
    if raw or not getattr(tok, "chat_template", None):
        text = "\n".join(m["content"] for m in messages if m["role"] != "system")
        return tok(text)["input_ids"]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def generate_text(model, tok, messages: list[dict], *, raw: bool = False, max_new_tokens: int = 128,
                  temperature: float = 0.0, top_p: float = 1.0, streamer=None) -> str:
    import torch

    from .adapters.base import prepare_inputs

    ids = torch.tensor([build_prompt(tok, messages, raw)], device=next(model.parameters()).device)
    # Prompt tuning turns input_ids into inputs_embeds with its virtual tokens in front (generate then
    # returns the new tokens only); prefix tuning adds its cache and n placeholder ids.
    inputs = prepare_inputs(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, generation=True)
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens,
                             do_sample=sample, temperature=temperature if sample else None,
                             top_p=top_p if sample else None, top_k=None,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                             streamer=streamer, use_cache=True)
    new = out[0, inputs["input_ids"].shape[1]:] if "input_ids" in inputs else out[0]
    return tok.decode(new, skip_special_tokens=True).strip()


def main(ns) -> int:
    import torch

    torch.manual_seed(ns.seed)
    model, tok = load_for_inference(ns.source, base=ns.base, dtype=ns.dtype, use_adapter=not ns.no_adapter,
                                    quant_bits=getattr(ns, "quant_bits", None))
    system = [{"role": "system", "content": ns.system}] if ns.system else []
    opts = dict(raw=ns.raw, max_new_tokens=ns.max_new_tokens, temperature=ns.temperature, top_p=ns.top_p)
    if not ns.chat:
        if not ns.prompt:
            raise ModelError("nothing to generate: pass --prompt TEXT (repeatable) or --chat")
        for prompt in ns.prompt:
            reply = generate_text(model, tok, system + [{"role": "user", "content": prompt}], **opts)
            print(f"> {prompt}\n{reply}\n" if len(ns.prompt) > 1 else reply)
        return 0
    from transformers import TextStreamer

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
