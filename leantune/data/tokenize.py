"""Tokenize one record and mask its labels: which tokens the model is trained to predict.

Labels are aligned with input_ids (the HF convention: the loss shifts them), -100 where a token is
not trained. Responses only by default; `train_on_prompt` trains every token.

Chat-form records (chat, and alpaca / prompt-completion when there is a chat template) are rendered
by the template, and the trained spans come from the template's own turn boundaries, never from
searching for the response text. For assistant turn i:

    start = len(tokens(render(messages[:i], add_generation_prompt=True)))    # after the assistant header
    end   = len(tokens(render(messages[:i + 1])))                           # through its end-of-turn

which holds only if every shorter render is a prefix of the full one, in text and in tokens; both are
checked, and a template that breaks it is an error (labels would be wrong silently otherwise). The
end-of-turn token (ChatML `<|im_end|>`, Llama-3 `<|eot_id|>`, ...) lies inside [start, end), so it is
trained and the model learns to stop; a template whose assistant turns end in no special token gets
an EOS inserted at the end of each assistant turn (checked on the turn's last non-whitespace token).

Without a chat template, alpaca renders as (see formats.PLAIN_ALPACA)

    ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n{output}<eos>

and prompt/completion as prompt + completion + eos. The prompt and the response are tokenized
separately, as they are at inference time (the prompt alone, then generation).

BOS: exactly one when the tokenizer normally adds one (Llama-style), none otherwise. Template output
is tokenized with add_special_tokens=False and BOS is prepended only when the rendered text does not
already start with it: templates that write `{{ bos_token }}` (Llama 3, Mistral, Gemma) never get a
second one, and a template that omits it still gives the BOS the model was pretrained with.
Plain prompts and raw text follow the same rule.

The first token of every example is never trained: nothing precedes it. This also keeps packed
rows honest (the first token of a packed example would otherwise be "predicted" from the last token
of the one before).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..errors import DataError
from .formats import Sample, detect_format, normalize

IGNORE = -100

# A ChatML template for tokenizers that have none: data.chat_template: chatml
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
NAMED_TEMPLATES = {"chatml": CHATML}


@dataclass(slots=True)
class Example:
    """One tokenized example: labels[t] is the target at position t, or -100 (not trained)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


@dataclass(frozen=True)
class TokenizerInfo:
    """What the pipeline needs to know about a tokenizer, computed once."""

    bos_id: int | None
    eos_id: int | None
    adds_bos: bool  # tokenizer(text) prepends BOS (Llama-style)
    stop_ids: frozenset[int]  # tokens that end a turn: EOS and the special tokens other than bos/pad/unk
    template: str | None  # the chat template in use, or None: plain prompt format


_INFO_CACHE: "weakref.WeakKeyDictionary[Any, dict[str | None, TokenizerInfo]]" = weakref.WeakKeyDictionary()


def resolve_chat_template(tokenizer: Any, spec: str | None) -> str | None:
    """The Jinja template to render with: data.chat_template (a name, a file or inline Jinja), else the tokenizer's."""
    if spec is None:
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        return template or None
    if spec.strip().lower() in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[spec.strip().lower()]
    if "{{" in spec or "{%" in spec:
        return spec
    path = Path(spec).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    raise DataError(f"data.chat_template {spec!r} is not a file, a Jinja template or a known name "
                    f"({', '.join(NAMED_TEMPLATES)}); fix the path or inline the template")


def tokenizer_info(tokenizer: Any, chat_template: str | None = None) -> TokenizerInfo:
    try:
        per_tok = _INFO_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable: compute every time
        per_tok = {}
    if chat_template not in per_tok:
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        probe = tokenizer.encode("a", add_special_tokens=True)
        adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
        specials = {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
        specials |= set(tokenizer.all_special_ids)
        specials -= {bos, tokenizer.pad_token_id, tokenizer.unk_token_id}
        if eos is not None:
            specials.add(eos)
        per_tok[chat_template] = TokenizerInfo(bos, eos, adds_bos, frozenset(specials),
                                               resolve_chat_template(tokenizer, chat_template))
    return per_tok[chat_template]


def pad_id_for(tokenizer: Any) -> tuple[int, str | None]:
    """The id to pad batches with, and a note for the report when it is not the tokenizer's pad token.

    Padding positions always carry label -100 and are masked out of attention (or form their own
    packed segment), so any valid id works; the tokenizer itself is left untouched.
    """
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id, None
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id, (f"the tokenizer has no pad token; batches are padded with the EOS id "
                                        f"{tokenizer.eos_token_id} (label -100, never trained)")
    return 0, "the tokenizer has neither a pad nor an EOS token; batches are padded with id 0 (label -100)"


def tokenize_example(record: dict[str, Any], fmt: str, tokenizer: Any, cfg: DataConfig,
                     index: int = 0) -> Example:
    """Tokenize record number `index` (0-based) of format `fmt` and mask its labels.

    No truncation here: the over-long policy (data.overlong) is applied by dataset.build().
    Raises DataError for a malformed record, formats.SkipExample for an empty response.
    """
    if fmt == "auto":
        fmt = detect_format([record])
    info = tokenizer_info(tokenizer, cfg.chat_template)
    sample = normalize(record, fmt, index, cfg.system_prompt)
    where = f"record {index + 1}"
    if sample.text is not None:
        return _text_example(sample.text, tokenizer, info, where)
    if info.template is None:
        if sample.plain is None:
            raise DataError(f"{where}: the tokenizer has no chat template, so {fmt} conversations cannot be "
                            f"rendered; set data.chat_template (a Jinja file, inline Jinja, or 'chatml')")
        return _plain_example(sample, tokenizer, info, cfg.train_on_prompt, where)
    return _chat_example(sample.messages, tokenizer, info, cfg.train_on_prompt, where)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _need_eos(info: TokenizerInfo, where: str) -> int:
    if info.eos_id is None:
        raise DataError(f"{where}: the tokenizer has no EOS token, so the model cannot learn to stop; "
                        f"set eos_token in the tokenizer config")
    return info.eos_id


def _finish(ids: list[int], trained: list[bool]) -> Example:
    labels = [t if keep else IGNORE for t, keep in zip(ids, trained)]
    if labels:
        labels[0] = IGNORE  # nothing precedes the first token
    return Example(ids, labels)


def _text_example(text: str, tokenizer: Any, info: TokenizerInfo, where: str) -> Example:
    ids = _encode(tokenizer, text)
    if info.adds_bos and (not ids or ids[0] != info.bos_id):
        ids.insert(0, info.bos_id)
    eos = _need_eos(info, where)
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return _finish(ids, [True] * len(ids))


def _plain_example(sample: Sample, tokenizer: Any, info: TokenizerInfo, train_on_prompt: bool,
                   where: str) -> Example:
    prompt, response = sample.plain
    prompt_ids = _encode(tokenizer, prompt)
    if info.adds_bos and (not prompt_ids or prompt_ids[0] != info.bos_id):
        prompt_ids.insert(0, info.bos_id)
    response_ids = _encode(tokenizer, response)
    eos = _need_eos(info, where)
    if not response_ids or response_ids[-1] != eos:
        response_ids.append(eos)
    return _finish(prompt_ids + response_ids, [train_on_prompt] * len(prompt_ids) + [True] * len(response_ids))


def _render(tokenizer: Any, messages: list[dict], template: str, generation_prompt: bool, where: str) -> str:
    try:
        return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                             add_generation_prompt=generation_prompt)
    except Exception as e:  # jinja's raise_exception(), or a template that indexes an empty list
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"{where}: the chat template cannot render the first {len(messages)} message(s) "
                        f"({msg}); fix the conversation's roles/order or set data.chat_template") from None


def _prefix_len(prefix: str, full_text: str, full_ids: list[int], tokenizer: Any, where: str) -> int:
    """Token length of a rendered prefix, after checking it is a prefix of the full render (text and tokens)."""
    if not full_text.startswith(prefix):
        raise DataError(f"{where}: the chat template does not render conversations prefix-wise (a shorter "
                        f"conversation is not a prefix of the full one, e.g. it rewrites earlier turns), so turn "
                        f"boundaries cannot be found; use a template that does via data.chat_template")
    ids = _encode(tokenizer, prefix)
    if full_ids[:len(ids)] != ids:
        raise DataError(f"{where}: the tokenizer merges tokens across a turn boundary of the chat template "
                        f"(near {prefix[-30:]!r}), so labels cannot be split there; use a template whose turns "
                        f"end in special tokens via data.chat_template")
    return len(ids)


def _ends_with_stop(turn: list[int], tokenizer: Any, info: TokenizerInfo) -> bool:
    """Whether the last token of a turn that is not whitespace (ChatML's trailing newline) ends it."""
    for t in reversed(turn):
        if t in info.stop_ids:
            return True
        if tokenizer.decode([t], skip_special_tokens=False).strip():
            return False
    return False


def _chat_example(messages: list[dict], tokenizer: Any, info: TokenizerInfo, train_on_prompt: bool,
                  where: str) -> Example:
    template = info.template
    full_text = _render(tokenizer, messages, template, False, where)
    full_ids = _encode(tokenizer, full_text)
    spans = []  # [start, end) token spans of the assistant turns
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], template, True, where)
        turn = _render(tokenizer, messages[: i + 1], template, False, where)
        start = _prefix_len(head, full_text, full_ids, tokenizer, where)
        end = _prefix_len(turn, full_text, full_ids, tokenizer, where)
        if end <= start:
            raise DataError(f"{where}: assistant message {i} renders to no tokens with this chat template; "
                            f"check the template handles the assistant role")
        spans.append((start, end))

    ids: list[int] = []
    trained: list[bool] = []
    pos = 0
    for start, end in spans:
        ids += full_ids[pos:start]
        trained += [train_on_prompt] * (start - pos)
        turn = full_ids[start:end]
        if not _ends_with_stop(turn, tokenizer, info):  # the template ends the turn in plain text
            turn = turn + [_need_eos(info, where)]
        ids += turn
        trained += [True] * len(turn)
        pos = end
    ids += full_ids[pos:]
    trained += [train_on_prompt] * (len(full_ids) - pos)
    if info.adds_bos and (not ids or ids[0] != info.bos_id):  # as tokenizer(text) would, unless the template did
        ids.insert(0, info.bos_id)
        trained.insert(0, False)
    return _finish(ids, trained)
