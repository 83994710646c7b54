"""Bad input gets one line that names the fix, exit code 2, no traceback, and nothing that looks complete.

Each case is a malformed config, dataset or model path run through the real CLI entry point.
"""

from __future__ import annotations

import json

import pytest

from leantune.cli.main import main
from tests.conftest import assert_one_line_error

GOOD_CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the fox"}]}


def _write(path, text):
    path.write_text(text)
    return path


def _jsonl(path, records):
    return _write(path, "".join(json.dumps(r) + "\n" for r in records))


# Each case: (id, builder(tmp_path, model_dir) -> argv, words the message must contain)
def case_missing_config(t, m):
    return ["train", str(t / "nope.yaml")], ["does not exist"]


def case_yaml_syntax(t, m):
    return ["train", str(_write(t / "c.yaml", "model: [unclosed\n"))], ["not valid YAML", "line"]


def case_yaml_not_mapping(t, m):
    return ["train", str(_write(t / "c.yaml", "- a\n- b\n"))], ["mapping"]


def case_empty_config(t, m):
    return ["train", str(_write(t / "c.yaml", ""))], ["empty", "model"]


def case_unknown_key_suggests(t, m):
    return ["train", str(_write(t / "c.yaml", f"model: {m}\nlora:\n  rnak: 8\n"))], ["lora.rnak", "lora.rank"]


def case_unknown_top_key_suggests(t, m):
    return ["train", str(_write(t / "c.yaml", f"model: {m}\nrank: 8\n"))], ["'rank'", "lora.rank"]


def case_wrong_type(t, m):
    return ["train", str(_write(t / "c.yaml", f"model: {m}\nlora: {{rank: big}}\n"))], ["lora.rank", "integer"]


def case_rank_zero(t, m):
    return _train(t, m, "--lora.rank", "0"), ["lora.rank", "> 0"]


def case_bad_literal_suggests(t, m):
    return _train(t, m, "--train.schedule", "cosin"), ["train.schedule", "cosine"]


def case_negative_lr(t, m):
    return _train(t, m, "--train.lr", "-1"), ["train.lr"]


def case_unknown_cli_flag(t, m):
    return _train(t, m, "--lora.rnak", "8"), ["--lora.rnak", "--lora.rank"]


def case_no_model(t, m):
    return ["train", "--data.path", str(_jsonl(t / "d.jsonl", [GOOD_CHAT]))], ["model"]


def case_model_path_missing(t, m):
    return _train(t, t / "no-such-model"), ["no-such-model"]


def case_model_folder_without_config(t, m):
    (t / "empty-model").mkdir()
    return _train(t, t / "empty-model"), ["config.json"]


def case_hub_id_offline(t, m):
    return _train(t, "some-org/some-model-that-is-not-here"), ["offline"]


def case_tokenizer_of_another_model(t, m):
    from conftest import build_llama, build_tokenizer

    tok = build_tokenizer()
    tok.save_pretrained(t / "mixed")
    build_llama(t / "mixed", vocab_size=len(tok) - 100)  # its embedding is smaller than the tokenizer
    return _train(t, t / "mixed"), [f"{len(tok)} tokens", f"{len(tok) - 100} rows", "tokenizer"]


def case_data_missing(t, m):
    return _train(t, m, data=t / "missing.jsonl"), ["missing.jsonl"]


def case_data_empty(t, m):
    return _train(t, m, data=_write(t / "empty.jsonl", "")), ["empty"]


def case_data_bad_json(t, m):
    return _train(t, m, data=_write(t / "bad.jsonl", json.dumps(GOOD_CHAT) + "\n{oops\n")), ["line 2"]


def case_data_unknown_format(t, m):
    return _train(t, m, data=_jsonl(t / "d.jsonl", [{"question": "a", "reply": "b"}])), ["instruction"]


def case_data_missing_field(t, m):
    recs = [{"instruction": "a", "output": "b"}, {"instruction": "c"}]
    return _train(t, m, data=_jsonl(t / "d.jsonl", recs)), ["output"]


def case_data_unknown_extension(t, m):
    return _train(t, m, data=_write(t / "d.xml", "<a/>")), [".xml"]


def case_no_trained_tokens(t, m):
    recs = [{"messages": [{"role": "user", "content": "hello there"}]}] * 3
    return _train(t, m, data=_jsonl(t / "d.jsonl", recs)), ["skipped"]


def case_targets_match_nothing(t, m):
    return _train(t, m, "--lora.targets", "[nonexistent_proj]"), ["nonexistent_proj", "q_proj"]


def case_resume_without_checkpoint(t, m):
    return _train(t, m, "--resume"), ["--resume"]


def case_threads_negative(t, m):
    return _train(t, m, "--threads", "-1"), ["threads", ">= 1"]


def case_eval_batches_zero(t, m):  # 0 used to turn evaluation off without a word
    return _train(t, m, "--train.eval_batches", "0"), ["train.eval_batches", "data.eval_fraction 0"]


def case_output_dir_is_a_file(t, m):
    return _train(t, m, "--output_dir", str(_write(t / "notes.txt", "mine"))), ["notes.txt", "is a file"]


def case_output_dir_inside_a_file(t, m):
    return _train(t, m, "--output_dir", str(_write(t / "notes.txt", "mine") / "run")), ["notes.txt", "a file"]


def case_examples_longer_than_the_model_positions(t, m):
    long = {"messages": [{"role": "user", "content": "one two " * 400}, {"role": "assistant", "content": "ok"}]}
    data = _jsonl(t / "long.jsonl", [long] + [GOOD_CHAT] * 3)
    return _train(t, m, "--data.max_length", "2048", data=data), ["data.max_length 2048", "512 positions",
                                                                  "--data.max_length 512"]


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


def _train(t, model, *extra, data=None):
    data = data or _jsonl(t / "good.jsonl", [GOOD_CHAT] * 4)
    return ["train", "--model", str(model), "--data.path", str(data), "--output_dir", str(t / "run"),
            "--train.progress", "false", "--train.tensorboard", "false", "--train.max_steps", "1", *extra]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_one_line_error_exit_2(case, tmp_path, tiny_llama_dir, capsys):
    argv, words = case(tmp_path, tiny_llama_dir)
    rc = main(argv) if "--help" not in argv else None
    out = capsys.readouterr()
    assert rc == 2, out
    assert_one_line_error(out, words)
    run = tmp_path / "run"
    assert not (run / "adapter").exists() and not (run / "summary.json").exists()


def test_there_are_at_least_15_cases():
    assert len(CASES) >= 15


@pytest.mark.parametrize("where", ["file", "inside-a-file", "read-only"])
def test_unusable_output_dir_is_refused_before_the_model_loads(where, tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """Found before loading (minutes for a real model), not when the first file is written."""
    import os

    from leantune.train import setup

    monkeypatch.setattr(setup, "load_model", lambda *a, **k: pytest.fail("the model was loaded first"))
    monkeypatch.setattr(setup, "load_tokenizer", lambda *a, **k: pytest.fail("the tokenizer was loaded first"))
    if where == "read-only":
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        out = ro / "run"
        if os.geteuid() == 0:  # root may write anywhere: answer for the folder as the kernel would for a user
            access = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: os.path.abspath(p) != str(ro) and access(p, mode, **kw))
    else:
        out = _write(tmp_path / "f", "x") / ("run" if where == "inside-a-file" else "")
    assert main(_train(tmp_path, tiny_llama_dir, "--output_dir", str(out))) == 2
    assert "output_dir" in capsys.readouterr().err
