"""The text a row streams: decode its tokens so far, send only what is new, hold back a tail that may still
grow into a stop string (or half of a multi-byte character), and say when the row is finished."""

from __future__ import annotations

from .request import Request


def emit_text(tok, eos: set[int], r: Request, token: int) -> str | None:
    """Send the new text (holding back what may still turn into a stop string); the finish reason or None."""
    ends = token in eos
    ids = r.tokens[:-1] if ends else r.tokens
    text = tok.decode(ids, skip_special_tokens=True)
    stops = [s for s in r.sampling.stop if s]
    hit = min((text.find(s, max(0, r.sent - len(s) + 1)) for s in stops if s in text[max(0, r.sent - len(s) + 1):]),
              default=-1)
    if hit >= 0:
        text, reason = text[:hit], "stop"
    elif ends:
        reason = "stop"
    elif len(r.tokens) >= r.sampling.max_tokens:
        reason = "length"
    else:
        reason = None
        hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        text = text[:len(text) - hold]
        if text.endswith("\ufffd"):      # half of a multi-byte character: wait for the rest
            text = text[:-1]
    if len(text) > r.sent:
        r.emit("token", {"text": text[r.sent:]})
        r.sent = len(text)
    return reason
