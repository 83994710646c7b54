"""The tokenizer as GGUF metadata (tokenizer.ggml.*), the way llama.cpp's convert_hf_to_gguf.py writes it.

Two vocabulary kinds:
  * byte-level BPE (GPT-2 style: SmolLM, Qwen2, Llama 3): model "gpt2", tokens, token types, merges;
  * SentencePiece (Llama 2, Mistral v0.1-v0.3 with tokenizer.model): model "llama", tokens, scores, types.
`tokenizer.ggml.pre` names the pre-tokenizer llama.cpp should apply. convert_hf_to_gguf recognises it
by hashing the tokenization of a probe text; we recognise the few families we support by their shape
and fall back to "default" (llama.cpp then warns and uses its GPT-2 regex).
"""

from __future__ import annotations

import json
from pathlib import Path

from gguf import GGUFWriter, TokenType

from ...errors import ModelError


def _pre_tokenizer(arch: str, tok, vocab_size: int) -> str:
    if arch in ("qwen2", "qwen3"):  # Qwen3 keeps Qwen2's tokenizer
        return "qwen2"
    if vocab_size >= 128000 and "<|begin_of_text|>" in tok.get_vocab():
        return "llama-bpe"
    if "<|im_start|>" in tok.get_vocab() and vocab_size == 49152:
        return "smollm"
    return "default"


def _merges(folder: Path) -> list[str]:
    model = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def _adds_prefix_space(folder: Path) -> bool:
    """Whether the byte-level pre-tokenizer puts a space before the first word (GPT-2 style add_prefix_space)."""
    pre = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    return any(p.get("type") == "ByteLevel" and p.get("add_prefix_space") for p in parts if isinstance(p, dict))


def _bpe_tokens(tok, n_vocab: int) -> tuple[list[str], list[int]]:
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = {t.content: t.special for t in tok.added_tokens_decoder.values()}
    tokens, types = [], []
    for i in range(n_vocab):
        t = by_id.get(i)
        if t is None:  # config vocab_size padded past the tokenizer: llama.cpp wants a name per row
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(TokenType.CONTROL if added[t] else TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(TokenType.NORMAL)
    return tokens, types


def _spm_vocab(writer: GGUFWriter, model_file: Path, n_vocab: int) -> None:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(model_file))
    tokens, scores, types = [], [], []
    for i in range(n_vocab):
        if i >= sp.vocab_size():
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(TokenType.UNUSED)
            continue
        tokens.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        types.append(TokenType.UNKNOWN if sp.is_unknown(i) else TokenType.CONTROL if sp.is_control(i)
                     else TokenType.UNUSED if sp.is_unused(i) else TokenType.BYTE if sp.is_byte(i) else TokenType.NORMAL)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)


def add_tokenizer(writer: GGUFWriter, folder: Path, tok, arch: str, n_vocab: int) -> None:
    """Write tokenizer.ggml.* and tokenizer.chat_template for the tokenizer `tok` loaded from `folder`."""
    if (folder / "tokenizer.model").is_file():
        _spm_vocab(writer, folder / "tokenizer.model", n_vocab)
    elif (folder / "tokenizer.json").is_file():
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(arch, tok, n_vocab))
        tokens, types = _bpe_tokens(tok, n_vocab)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(_merges(folder))
        writer.add_add_space_prefix(_adds_prefix_space(folder))
    else:
        raise ModelError(f"{folder} has neither tokenizer.json nor tokenizer.model; save the tokenizer with "
                         f"tokenizer.save_pretrained() next to the model")
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "unk": tok.unk_token_id, "pad": tok.pad_token_id}
    setters = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
               "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for key, value in ids.items():
        if value is not None:
            setters[key](int(value))
    probe = tok("a")["input_ids"]
    writer.add_add_bos_token(bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id))
    if getattr(tok, "chat_template", None):
        writer.add_chat_template(tok.chat_template)
