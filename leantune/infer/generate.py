"""Generation with a base model plus an adapter: load what the user points at, then generate text.

What a path means (a run folder, an adapter folder, a plain model) is decided by
`checkpoint/run_folder.py`; the command and its interactive chat are `cli/chat.py`.
"""

from __future__ import annotations

import sys

import torch

from ..adapters.base import prepare_inputs
from ..checkpoint.adapter_io import load_adapter
from ..checkpoint.run_folder import find_model_and_adapter, run_info
from ..config import QuantConfig
from ..data.tokenize import resolve_chat_template
from ..device import pick_dtype, resolve_device
from ..models.load import check_vocab, load_model, load_tokenizer
from ..quant import spec_of


def load_for_inference(source: str, *, base: str | None = None, dtype: str = "auto", use_adapter: bool = True,
                       quant_bits: int | None = None, device: str = "auto"):
    """Return (model, tokenizer) ready for generation, the adapter attached (not merged), on `device`
    (auto: a GPU when torch sees one, else the CPU).

    The base is quantized as the run that trained the adapter had it (the `quant` of its sidecar,
    checkpoint/run_folder.py), or to `quant_bits` when given. The tokenizer carries the run's chat template
    (data.chat_template, resolved in the sidecar) when the run set one: the model is prompted as it was trained.
    """
    model_src, adapter = find_model_and_adapter(source, base)
    device = resolve_device(device)
    info = run_info(source)  # the sidecar, read once: how the base was loaded and prompted in training
    tok = load_tokenizer(model_src, trust_remote_code=bool(info and info.trust_remote_code))
    if use_adapter and info is not None and info.chat_template:
        tok.chat_template = resolve_chat_template(tok, info.chat_template)
    quant = QuantConfig(bits=quant_bits) if quant_bits is not None else info.quant_config() if info else None
    model = load_model(model_src, dtype=pick_dtype(dtype, device), device=device, quant=quant)
    check_vocab(model, tok)
    if (spec := spec_of(model)) is not None:
        print(f"note: generating with a {spec.bits}-bit base", file=sys.stderr)
    if adapter is not None and use_adapter:
        load_adapter(model, adapter)
        model.to(device)
    model.eval().requires_grad_(False)
    return model, tok


def run_system_prompt(source: str) -> str | None:
    """The run's data.system_prompt: the system message it trained with, the default for generation."""
    info = run_info(source)
    return info.system_prompt if info is not None else None


def build_prompt(tok, messages: list[dict], raw: bool) -> list[int]:
    if raw or not getattr(tok, "chat_template", None):
        text = "\n".join(m["content"] for m in messages if m["role"] != "system")
        return tok(text)["input_ids"]
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


def generate_text(model, tok, messages: list[dict], *, raw: bool = False, max_new_tokens: int = 128,
                  temperature: float = 0.0, top_p: float = 1.0, streamer=None) -> str:
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
