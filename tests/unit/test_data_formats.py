"""Formats: detection from the first record's fields, normalisation, and errors naming record and field."""

from __future__ import annotations

import pytest

from leantune.data.formats import PLAIN_ALPACA, SkipExample, detect_format, normalize
from leantune.errors import DataError


@pytest.mark.parametrize("record,fmt", [
    ({"messages": [], "id": 1}, "chat"),
    ({"conversations": []}, "chat"),
    ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
    ({"instruction": "a", "output": "b", "text": "also here"}, "alpaca"),
    ({"prompt": "a", "completion": "b"}, "prompt_completion"),
    ({"text": "a"}, "text"),
])
def test_detect_format(record, fmt):
    assert detect_format([record, {"whatever": 1}]) == fmt


def test_unknown_format_lists_the_accepted_field_sets():
    with pytest.raises(DataError) as e:
        detect_format([{"question": "a", "answer": "b"}])
    msg = str(e.value)
    assert "answer, question" in msg and "data.format" in msg
    for fields in ("{messages}", "{conversations}", "{instruction, output", "{prompt, completion}", "{text}"):
        assert fields in msg
    assert "\n" not in msg


def test_unknown_format_name():
    with pytest.raises(DataError, match="unknown data.format 'jsonl'"):
        normalize({"text": "a"}, "jsonl", 0)


@pytest.mark.parametrize("record,fmt,field", [
    ({"input": "x", "output": "y"}, "alpaca", "instruction"),
    ({"instruction": "x"}, "alpaca", "output"),
    ({"prompt": "x"}, "prompt_completion", "completion"),
    ({"content": "x"}, "text", "text"),
    ({"text": "x"}, "chat", "messages"),
])
def test_missing_field_names_record_and_field(record, fmt, field):
    with pytest.raises(DataError, match=f"record 7 has no '{field}' field, which the {fmt} format needs"):
        normalize(record, fmt, 6)


def test_a_null_field_is_called_null_not_missing():
    with pytest.raises(DataError, match="record 7: 'instruction' is null; the alpaca format needs it as text"):
        normalize({"instruction": None, "output": "y"}, "alpaca", 6)


@pytest.mark.parametrize("messages,match", [
    ([{"role": "robot", "content": "x"}], "messages\\[0\\] has role 'robot'; accepted: "),
    ([{"role": "user"}], "messages\\[0\\] has no 'content'"),
    ([{"content": "x"}], "messages\\[0\\] has no 'role'"),
    (["hello"], "messages\\[0\\] must be an object"),
    ([], "non-empty list"),
    ([{"role": "user", "content": {"image": 1}}], "must be a string"),
])
def test_bad_chat_messages(messages, match):
    with pytest.raises(DataError, match="record 3"):
        normalize({"messages": messages}, "chat", 2)
    with pytest.raises(DataError, match=match):
        normalize({"messages": messages}, "chat", 2)


def test_sharegpt_roles_are_mapped():
    s = normalize({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"},
                                     {"from": "gpt", "value": "a"}]}, "chat", 0)
    assert s.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                          {"role": "assistant", "content": "a"}]


def test_alpaca_normalises_to_chat_and_plain():
    s = normalize({"instruction": "Do it", "input": "now", "output": "done"}, "alpaca", 0)
    assert s.messages == [{"role": "user", "content": "Do it\n\nnow"}, {"role": "assistant", "content": "done"}]
    assert s.plain == (PLAIN_ALPACA.format(instruction="Do it", input="now"), "done")
    s = normalize({"instruction": "Do it", "output": "done"}, "alpaca", 0, system_prompt="Be nice")
    assert s.messages[0] == {"role": "system", "content": "Be nice"}
    assert s.plain == ("Be nice\n\n### Instruction:\nDo it\n\n### Response:\n", "done")


def test_system_prompt_does_not_replace_an_existing_one():
    s = normalize({"messages": [{"role": "system", "content": "mine"}, {"role": "user", "content": "q"}]},
                  "chat", 0, system_prompt="default")
    assert [m["content"] for m in s.messages] == ["mine", "q"]


def test_conversational_prompt_completion_and_content_parts():
    s = normalize({"prompt": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                   "completion": [{"role": "assistant", "content": "yo"}]}, "prompt_completion", 0)
    assert s.messages == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert s.plain is None


def test_empty_response_is_a_counted_skip_not_an_error_elsewhere():
    with pytest.raises(SkipExample) as e:
        normalize({"instruction": "x", "output": "  "}, "alpaca", 0)
    assert e.value.reason == "empty response"
    with pytest.raises(SkipExample):
        normalize({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "chat", 0)
