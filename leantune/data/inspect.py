"""Show examples the way the model sees them: which tokens are trained, and BOS/EOS sanity checks.

    example 1: 31 tokens, 6 trained, BOS 0, EOS 2
    <|im_start|>user
    what is the capital?<|im_end|>
    <|im_start|>assistant
    [[paris<|im_end|>
    ]]

Trained tokens are wrapped in [[...]] (plain text), or shown bold green with the prompt dimmed
when `color` is on (default: when stdout is a terminal).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence
from typing import Any

from .tokenize import IGNORE, Example, tokenizer_info

_DIM, _TRAINED, _RESET = "\x1b[2m", "\x1b[1;32m", "\x1b[0m"


def render_examples(examples: Sequence[Example], tokenizer: Any, n: int = 3, color: bool | None = None) -> str:
    """The first `n` examples as text with trained tokens marked, per-example counts and warnings."""
    if color is None:
        color = sys.stdout.isatty()
    info = tokenizer_info(tokenizer)
    blocks = []
    for k, ex in enumerate(examples[:n]):
        ids, labels = ex.input_ids, ex.labels
        bos = sum(1 for t in ids if t == info.bos_id) if info.bos_id is not None else 0
        eos = sum(1 for t in ids if t == info.eos_id) if info.eos_id is not None else 0
        head = f"example {k + 1}: {len(ids)} tokens, {ex.num_trained} trained, BOS {bos}, EOS {eos}"
        warnings = []
        if info.bos_id is not None and ids[:2] == [info.bos_id, info.bos_id]:
            warnings.append("warning: double BOS at the start (the template and the tokenizer both add one)")
        if not any(t in info.stop_ids for t in labels if t != IGNORE):
            warnings.append("warning: no EOS/end-of-turn token is trained, so the model does not learn to stop")
        blocks.append("\n".join([head, *warnings, _marked(ids, labels, tokenizer, color)]))
    shown = min(n, len(examples))
    blocks.append(f"({shown} of {len(examples)} examples shown)")
    return "\n\n".join(blocks)


def _marked(ids: list[int], labels: list[int], tokenizer: Any, color: bool) -> str:
    out = []
    # runs of trained / untrained tokens, decoded run by run so multi-token characters stay whole
    for trained, run in itertools.groupby(zip(ids, labels), key=lambda p: p[1] != IGNORE):
        text = tokenizer.decode([t for t, _ in run], skip_special_tokens=False)
        if color:
            out.append(f"{_TRAINED if trained else _DIM}{text}{_RESET}")
        else:
            out.append(f"[[{text}]]" if trained else text)
    return "".join(out)
