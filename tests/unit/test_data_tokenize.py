"""Label masking: for every format, prompt tokens carry -100 and responses plus their end-of-turn don't.

The reference is live: the full text must decode to what the tokenizer's own apply_chat_template
renders, and the trained runs must decode to exactly the assistant contents plus end-of-turn.
"""

from __future__ import annotations

import itertools

import pytest
from conftest import CHATML, build_tokenizer

from leantune.config import DataConfig
from leantune.data.formats import PLAIN_ALPACA, PLAIN_ALPACA_NO_INPUT
from leantune.data.tokenize import IGNORE, pad_id_for, tokenize_example
from leantune.errors import DataError

SYS, Q1, A1, Q2, A2 = "be brief", "what is the capital of france?", "paris", "and one two?", "three four"
END = "<|im_end|>\n"


@pytest.fixture(scope="module")
def toks():
    return {"chatml": build_tokenizer(), "chatml+bos": build_tokenizer(bos=True),
            "plain": build_tokenizer(chat_template=None), "plain+bos": build_tokenizer(chat_template=None, bos=True)}


def runs(tok, ex):
    """Decoded text of each run of trained tokens."""
    out = []
    for trained, run in itertools.groupby(zip(ex.input_ids, ex.labels), key=lambda p: p[1] != IGNORE):
        if trained:
            out.append(tok.decode([t for t, _ in run], skip_special_tokens=False))
    return out


def chatml(messages):
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}{END}" for m in messages)


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


# (name, record, fmt, full text with the ChatML template, trained runs)
CHAT_CASES = [
    ("alpaca+input", {"instruction": Q1, "input": "one two", "output": A1}, "alpaca",
     chatml(msgs(("user", f"{Q1}\n\none two"), ("assistant", A1))), [A1 + END]),
    ("alpaca", {"instruction": Q1, "output": A1}, "alpaca", chatml(msgs(("user", Q1), ("assistant", A1))), [A1 + END]),
    ("alpaca+system", {"instruction": Q1, "output": A1, "system": SYS}, "alpaca",
     chatml(msgs(("system", SYS), ("user", Q1), ("assistant", A1))), [A1 + END]),
    ("chat", {"messages": msgs(("system", SYS), ("user", Q1), ("assistant", A1))}, "chat",
     chatml(msgs(("system", SYS), ("user", Q1), ("assistant", A1))), [A1 + END]),
    ("chat multi-turn", {"messages": msgs(("system", SYS), ("user", Q1), ("assistant", A1), ("user", Q2),
                                          ("assistant", A2))}, "chat",
     chatml(msgs(("system", SYS), ("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2))),
     [A1 + END, A2 + END]),
    ("sharegpt", {"conversations": [{"from": "human", "value": Q1}, {"from": "gpt", "value": A1},
                                    {"from": "human", "value": Q2}, {"from": "gpt", "value": A2}]}, "chat",
     chatml(msgs(("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2))), [A1 + END, A2 + END]),
    ("prompt/completion", {"prompt": Q1, "completion": A1}, "prompt_completion",
     chatml(msgs(("user", Q1), ("assistant", A1))), [A1 + END]),
    ("chat ends with user", {"messages": msgs(("user", Q1), ("assistant", A1), ("user", Q2))}, "chat",
     chatml(msgs(("user", Q1), ("assistant", A1), ("user", Q2))), [A1 + END]),
]


@pytest.mark.parametrize("name,record,fmt,full,trained", CHAT_CASES, ids=[c[0] for c in CHAT_CASES])
@pytest.mark.parametrize("variant", ["chatml", "chatml+bos"])
def test_chat_form_trains_responses_and_end_of_turn_only(toks, variant, name, record, fmt, full, trained):
    tok = toks[variant]
    ex = tokenize_example(record, fmt, tok, DataConfig())
    bos = "<s>" if variant.endswith("+bos") else ""
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == bos + full
    assert runs(tok, ex) == trained
    assert all(lab in (IGNORE, t) for t, lab in zip(ex.input_ids, ex.labels))
    assert ex.input_ids.count(tok.bos_token_id) == (1 if bos else 0)


PLAIN_CASES = [
    ("alpaca+input", {"instruction": Q1, "input": "one two", "output": A1}, "alpaca",
     PLAIN_ALPACA.format(instruction=Q1, input="one two"), A1),
    ("alpaca", {"instruction": Q1, "output": A1}, "alpaca", PLAIN_ALPACA_NO_INPUT.format(instruction=Q1), A1),
    ("prompt/completion", {"prompt": Q1, "completion": " " + A1}, "prompt_completion", Q1, " " + A1),
]


@pytest.mark.parametrize("name,record,fmt,prompt,response", PLAIN_CASES, ids=[c[0] for c in PLAIN_CASES])
@pytest.mark.parametrize("variant", ["plain", "plain+bos"])
def test_plain_format_without_chat_template(toks, variant, name, record, fmt, prompt, response):
    tok = toks[variant]
    ex = tokenize_example(record, fmt, tok, DataConfig())
    bos = "<s>" if variant.endswith("+bos") else ""
    assert tok.decode(ex.input_ids, skip_special_tokens=False) == bos + prompt + response + "<|im_end|>"
    assert runs(tok, ex) == [response + "<|im_end|>"]
    assert ex.input_ids.count(tok.bos_token_id) == (1 if bos else 0)


@pytest.mark.parametrize("variant", ["chatml", "chatml+bos", "plain", "plain+bos"])
def test_text_trains_everything_with_one_bos_and_a_final_eos(toks, variant):
    tok = toks[variant]
    ex = tokenize_example({"text": "the quick brown fox"}, "text", tok, DataConfig())
    has_bos = variant.endswith("+bos")
    assert ex.input_ids.count(tok.bos_token_id) == int(has_bos)
    assert ex.input_ids[-1] == tok.eos_token_id and ex.labels[-1] == tok.eos_token_id
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]  # nothing precedes token 0
    # already there: never doubled
    text = ("<s>" if has_bos else "") + "the quick brown fox<|im_end|>"
    again = tokenize_example({"text": text}, "text", tok, DataConfig())
    assert again.input_ids == ex.input_ids


@pytest.mark.parametrize("name,record,fmt", [(c[0], c[1], c[2]) for c in CHAT_CASES] + [
    ("plain", {"instruction": Q1, "output": A1}, "alpaca")])
def test_train_on_prompt_trains_every_token(toks, name, record, fmt):
    tok = toks["plain+bos" if name == "plain" else "chatml+bos"]
    ex = tokenize_example(record, fmt, tok, DataConfig(train_on_prompt=True))
    assert ex.labels[0] == IGNORE and ex.labels[1:] == ex.input_ids[1:]


def test_template_that_writes_bos_gets_no_second_one(toks):
    tok = toks["chatml+bos"]
    cfg = DataConfig(chat_template="{{ bos_token }}" + CHATML)
    ex = tokenize_example({"prompt": Q1, "completion": A1}, "prompt_completion", tok, cfg)
    assert ex.input_ids.count(tok.bos_token_id) == 1 and ex.input_ids[0] == tok.bos_token_id
    assert runs(tok, ex) == [A1 + END]


# A template whose turns end in plain text: no end-of-turn token, so EOS is inserted after each answer.
PLAIN_TURNS = ("{% for m in messages %}{{ m['role'] + ':\n' + m['content'] + '\n\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}")


def test_eos_inserted_when_the_template_does_not_end_the_turn(toks):
    tok = toks["chatml"]
    record = {"messages": msgs(("user", Q1), ("assistant", A1), ("user", Q2), ("assistant", A2))}
    ex = tokenize_example(record, "chat", tok, DataConfig(chat_template=PLAIN_TURNS))
    assert runs(tok, ex) == [A1 + "\n\n<|im_end|>", A2 + "\n\n<|im_end|>"]


def test_chatml_by_name_for_a_tokenizer_without_template(toks):
    tok = toks["plain"]
    record = {"messages": msgs(("user", Q1), ("assistant", A1))}
    with pytest.raises(DataError, match="no chat template.*data.chat_template"):
        tokenize_example(record, "chat", tok, DataConfig())
    ex = tokenize_example(record, "chat", tok, DataConfig(chat_template="chatml"))
    assert runs(tok, ex) == [A1 + END]


def test_template_file(toks, tmp_path):
    path = tmp_path / "t.jinja"
    path.write_text(PLAIN_TURNS)
    ex = tokenize_example({"prompt": Q1, "completion": A1}, "prompt_completion", toks["chatml"],
                          DataConfig(chat_template=str(path)))
    assert runs(toks["chatml"], ex) == [A1 + "\n\n<|im_end|>"]
    with pytest.raises(DataError, match="is not a file, a Jinja template or a known name"):
        tokenize_example({"prompt": Q1, "completion": A1}, "prompt_completion", toks["chatml"],
                         DataConfig(chat_template=str(tmp_path / "missing.jinja")))


def test_template_that_rewrites_earlier_turns_is_an_error(toks):
    # marks the last message: a shorter conversation is not a prefix of the longer one
    tmpl = CHATML.replace("message['content']", "message['content'] + ('!' if loop.last else '')")
    with pytest.raises(DataError, match="not render conversations prefix-wise"):
        tokenize_example({"prompt": Q1, "completion": A1}, "prompt_completion", toks["chatml"],
                         DataConfig(chat_template=tmpl))


def test_tokens_merging_across_a_turn_boundary_is_an_error(toks):
    # "assistant: " + "paris": byte-level BPE makes " paris" one pre-token across the boundary
    tmpl = PLAIN_TURNS.replace("':\n'", "': '").replace("'assistant:\n'", "'assistant: '")
    with pytest.raises(DataError, match="merges tokens across a turn boundary"):
        tokenize_example({"prompt": Q1, "completion": A1}, "prompt_completion", toks["chatml"],
                         DataConfig(chat_template=tmpl))


def test_template_that_raises_names_the_record(toks):
    tmpl = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(DataError, match="record 5: the chat template cannot render.*roles must alternate"):
        tokenize_example({"prompt": Q1, "completion": A1}, "prompt_completion", toks["chatml"],
                         DataConfig(chat_template=tmpl), index=4)


def test_no_assistant_turn_has_no_trained_tokens(toks):
    ex = tokenize_example({"messages": msgs(("user", Q1))}, "chat", toks["chatml"], DataConfig())
    assert ex.num_trained == 0 and len(ex) > 0


def test_system_prompt_from_config(toks):
    tok = toks["chatml"]
    ex = tokenize_example({"prompt": Q1, "completion": A1}, "prompt_completion", tok, DataConfig(system_prompt=SYS))
    assert tok.decode(ex.input_ids, skip_special_tokens=False).startswith(f"<|im_start|>system\n{SYS}{END}")


def test_pad_fallback_does_not_touch_the_tokenizer():
    tok = build_tokenizer()
    assert pad_id_for(tok) == (tok.pad_token_id, None)
    tok.pad_token = None
    pad, note = pad_id_for(tok)
    assert pad == tok.eos_token_id and "no pad token" in note
    assert tok.pad_token is None
