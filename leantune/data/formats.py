"""Record formats: recognise them, and turn any record into a conversation or a plain text.

    alpaca             {"instruction", "output", ["input"], ["system"]}
    chat               {"messages": [{"role": system|user|assistant|tool, "content"}]}          (OpenAI)
                       {"conversations": [{"from": system|human|gpt, "value"}]}               (ShareGPT)
    prompt_completion  {"prompt", "completion"}: two strings, or two message lists (TRL style)
    text               {"text"}: trained on every token

`normalize()` maps a record to a `Sample`: the chat messages that the tokenizer's template renders,
plus, for alpaca and string prompt/completion, the plain prompt/response pair used when the
tokenizer has no chat template (see tokenize.py). Record numbers in errors are 1-based, so record
N of a JSON Lines file is line N when the file has no blank lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import DataError

FORMATS = ("alpaca", "chat", "prompt_completion", "text")

# Field sets in the order they are tried: the first whose fields are all present wins.
_SIGNATURES: list[tuple[str, tuple[str, ...], str]] = [
    ("chat", ("messages",), "{messages} (chat, OpenAI roles)"),
    ("chat", ("conversations",), "{conversations} (chat, ShareGPT from/value)"),
    ("alpaca", ("instruction", "output"), "{instruction, output[, input, system]} (alpaca)"),
    ("prompt_completion", ("prompt", "completion"), "{prompt, completion} (prompt_completion)"),
    ("text", ("text",), "{text} (text)"),
]

_OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                 "tool": "tool"}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "tool": "tool"}

PLAIN_ALPACA = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PLAIN_ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


class SkipExample(DataError):
    """A record that is well-formed but unusable (an empty response); counted and skipped by build()."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Sample:
    """One record, normalised. Exactly one of `messages` and `text` is set."""

    messages: list[dict[str, str]] | None = None
    text: str | None = None
    # (prompt, response) for the no-chat-template fallback; None where only a template can render it.
    plain: tuple[str, str] | None = None
    has_system: bool = False


def detect_format(records: list[dict[str, Any]]) -> str:
    """The format of a dataset, read from the fields of its first record."""
    if not records:
        raise DataError("the dataset has no records, so its format cannot be detected; add records")
    keys = set(records[0])
    for fmt, needed, _ in _SIGNATURES:
        if all(k in keys for k in needed):
            return fmt
    accepted = "; ".join(desc for _, _, desc in _SIGNATURES)
    raise DataError(f"cannot detect the format of record 1 (fields: {', '.join(sorted(keys)) or 'none'}); "
                    f"accepted field sets: {accepted}. Rename the fields, or set data.format")


def normalize(record: dict[str, Any], fmt: str, index: int, system_prompt: str | None = None) -> Sample:
    """Map record number `index` (0-based; errors say index + 1) of format `fmt` to a Sample."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data.format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    where = f"record {index + 1}"
    if fmt == "text":
        return Sample(text=_string(record, "text", where, fmt))
    if fmt == "alpaca":
        sample = _alpaca(record, where)
    elif fmt == "prompt_completion":
        sample = _prompt_completion(record, where)
    else:
        sample = _chat(record, where)
    if system_prompt and not sample.has_system:
        sample.messages.insert(0, {"role": "system", "content": system_prompt})
        if sample.plain is not None:
            sample.plain = (f"{system_prompt}\n\n{sample.plain[0]}", sample.plain[1])
    return sample


def _missing(where: str, name: str, fmt: str) -> DataError:
    return DataError(f"{where} has no {name!r} field, which the {fmt} format needs; fix the record, "
                     f"or set data.format if the dataset is in another format")


def _string(record: dict, name: str, where: str, fmt: str, optional: bool = False) -> str:
    value = record.get(name)
    if value is None:
        if optional:
            return ""
        if name in record:  # present but null: say so, "missing" sends the user looking for a typo
            raise DataError(f"{where}: {name!r} is null; the {fmt} format needs it as text: fill it in or drop the record")
        raise _missing(where, name, fmt)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a CSV-born number: still text
    if not isinstance(value, str):
        raise DataError(f"{where}: {name!r} must be a string, got a {type(value).__name__}; fix the record")
    return value


def _response(text: str, where: str, name: str) -> str:
    if not text.strip():
        raise SkipExample("empty response", f"{where}: {name!r} is empty, so there is nothing to learn; "
                                            f"fill it in or drop the record")
    return text


def _alpaca(record: dict, where: str) -> Sample:
    instruction = _string(record, "instruction", where, "alpaca")
    inp = _string(record, "input", where, "alpaca", optional=True)
    output = _response(_string(record, "output", where, "alpaca"), where, "output")
    system = _string(record, "system", where, "alpaca", optional=True)
    user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    template = PLAIN_ALPACA if inp.strip() else PLAIN_ALPACA_NO_INPUT
    prompt = template.format(instruction=instruction, input=inp)
    if system:
        prompt = f"{system}\n\n{prompt}"
    return Sample(messages=messages, plain=(prompt, output), has_system=bool(system))


def _prompt_completion(record: dict, where: str) -> Sample:
    prompt, completion = record.get("prompt"), record.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
        for name, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, list):
                raise DataError(f"{where}: {name!r} must be a list of messages like the other field; fix the record")
        messages = _messages(prompt, where, "prompt", "role", "content", _OPENAI_ROLES)
        messages += _messages(completion, where, "completion", "role", "content", _OPENAI_ROLES)
        _check_assistant_turns(messages, where)
        return Sample(messages=messages, has_system=any(m["role"] == "system" for m in messages))
    prompt = _string(record, "prompt", where, "prompt_completion")
    completion = _response(_string(record, "completion", where, "prompt_completion"), where, "completion")
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    return Sample(messages=messages, plain=(prompt, completion))


def _chat(record: dict, where: str) -> Sample:
    if "messages" in record:
        raw, name, role_key, content_key, roles = record["messages"], "messages", "role", "content", _OPENAI_ROLES
    elif "conversations" in record:
        raw, name, role_key, content_key, roles = record["conversations"], "conversations", "from", "value", _SHAREGPT_ROLES
    else:
        raise _missing(where, "messages", "chat")
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: {name!r} must be a non-empty list of messages; fix the record")
    messages = _messages(raw, where, name, role_key, content_key, roles)
    _check_assistant_turns(messages, where)
    return Sample(messages=messages, has_system=any(m["role"] == "system" for m in messages))


def _messages(raw: list, where: str, name: str, role_key: str, content_key: str,
              roles: dict[str, str]) -> list[dict[str, str]]:
    out = []
    for j, m in enumerate(raw):
        at = f"{where}, {name}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"{at} must be an object with {role_key!r} and {content_key!r}; fix the record")
        if role_key not in m:
            raise DataError(f"{at} has no {role_key!r} field; each message needs {role_key!r} and {content_key!r}")
        role = roles.get(str(m[role_key]).lower())
        if role is None:
            raise DataError(f"{at} has {role_key} {m[role_key]!r}; accepted: {', '.join(sorted(roles))}")
        if content_key not in m:
            raise DataError(f"{at} has no {content_key!r} field; each message needs {role_key!r} and {content_key!r}")
        if m[content_key] is None:
            raise DataError(f"{at}: {content_key!r} is null; give the message its text (\"\" for none) or drop it")
        out.append({"role": role, "content": _content(m[content_key], at, content_key)})
    return out


def _content(value: Any, at: str, key: str) -> str:
    if isinstance(value, str):
        return value
    # OpenAI content parts: [{"type": "text", "text": "..."}]; only text is supported
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    raise DataError(f"{at}: {key!r} must be a string (or a list of text parts), got a "
                    f"{type(value).__name__}; images and other parts are not supported")


def _check_assistant_turns(messages: list[dict[str, str]], where: str) -> None:
    for j, m in enumerate(messages):
        if m["role"] == "assistant":
            _response(m["content"], where, f"message {j} (assistant)")
