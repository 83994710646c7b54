"""inspect: examples shown as the model sees them, with trained tokens marked and BOS/EOS warnings."""

from __future__ import annotations

from conftest import build_tokenizer

from leantune.config import DataConfig
from leantune.data.inspect import render_examples
from leantune.data.tokenize import IGNORE, Example, tokenize_example

CHAT = {"messages": [{"role": "user", "content": "one two"}, {"role": "assistant", "content": "three"},
                     {"role": "user", "content": "four"}, {"role": "assistant", "content": "five six"}]}


def test_trained_tokens_are_marked_plain():
    tok = build_tokenizer()
    ex = tokenize_example(CHAT, "chat", tok, DataConfig())
    out = render_examples([ex, ex], tok, n=1, color=False)
    assert out.startswith(f"example 1: {len(ex)} tokens, {ex.num_trained} trained, BOS 0, EOS 4\n")
    assert "<|im_start|>assistant\n[[three<|im_end|>\n]]<|im_start|>user" in out
    assert "[[five six<|im_end|>\n]]" in out
    assert "warning" not in out and out.endswith("(1 of 2 examples shown)")
    assert "\x1b[" not in out


def test_colour_mode_uses_ansi_instead_of_brackets():
    tok = build_tokenizer()
    out = render_examples([tokenize_example(CHAT, "chat", tok, DataConfig())], tok, n=1, color=True)
    assert "\x1b[1;32mthree<|im_end|>\n\x1b[0m" in out and "[[" not in out


def test_warns_on_double_bos_and_missing_eos():
    tok = build_tokenizer(bos=True)
    ids = tok.encode("the quick brown fox", add_special_tokens=True)
    bad = Example([tok.bos_token_id] + ids, [IGNORE, IGNORE] + ids[1:])
    out = render_examples([bad], tok, n=3, color=False)
    assert "BOS 2, EOS 0" in out
    assert "warning: double BOS" in out and "warning: no EOS/end-of-turn token is trained" in out
    good = tokenize_example({"text": "the quick brown fox"}, "text", tok, DataConfig())
    assert "warning" not in render_examples([good], tok, n=1, color=False)
