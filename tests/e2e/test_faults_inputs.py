"""More malformed inputs, each one line naming the fix with exit 2 (issue 16, item 8's list and beyond):
damaged model and adapter weights, a damaged GGUF, a LoRA rank wider than the model, empty replies and
user-only chats told what is wrong (not "raise data.max_length"), null fields called null (not missing).
Same harness as test_bad_input.py; docs/reliability.md counts the malformed inputs all suites cover."""

from __future__ import annotations

import json
import shutil

import pytest

from leantune.cli.main import main

from .test_bad_input import GOOD_CHAT, _jsonl, _train, _write


def _damaged_model(t, m, how="truncate"):
    d = t / f"model-{how}"
    shutil.copytree(m, d)
    w = d / "model.safetensors"
    raw = w.read_bytes()
    w.write_bytes(raw[: len(raw) // 2] if how == "truncate" else raw[:8] + b"x" * 32 + raw[40:])
    return d


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, tmp_path_factory):
    t = tmp_path_factory.mktemp("inputs-run")
    argv = ["train", "--model", str(tiny_llama_dir), "--data.path", str(_jsonl(t / "d.jsonl", [GOOD_CHAT] * 4)),
            "--output_dir", str(t / "run"), "--train.progress", "false", "--train.tensorboard", "false",
            "--train.max_steps", "1", "--lora.rank", "2"]
    assert main(argv) == 0
    return t / "run"


def _copy_run(t, run):
    shutil.copytree(run, t / "copy")
    return t / "copy"


def case_truncated_model_weights(t, m, run):
    return _train(t, _damaged_model(t, m)), ["file not fully covered", "damaged or truncated"]


def case_garbled_weights_header(t, m, run):
    return _train(t, _damaged_model(t, m, "garble")), ["invalid JSON in header", "damaged or truncated"]


def case_truncated_weights_in_generate(t, m, run):
    return ["generate", str(_damaged_model(t, m)), "--prompt", "hi"], ["damaged or truncated"]


def case_rank_wider_than_the_model(t, m, run):
    return _train(t, m, "--lora.rank", "1000"), ["lora.rank 1000", "min(in, out) = 64", "--lora.rank 64"]


def case_empty_replies(t, m, run):
    recs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}] * 3
    return _train(t, m, data=_jsonl(t / "e.jsonl", recs)), ["3 empty response", "non-empty reply"]


def case_user_only_chats(t, m, run):
    recs = [{"messages": [{"role": "user", "content": "hello"}]}] * 3
    return _train(t, m, data=_jsonl(t / "u.jsonl", recs)), ["no trained tokens", "non-empty reply"]


def case_null_alpaca_field(t, m, run):
    recs = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": None}]
    return _train(t, m, data=_jsonl(t / "n.jsonl", recs)), ["record 2", "'output' is null"]


def case_null_message_content(t, m, run):
    recs = [GOOD_CHAT, {"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "x"}]}]
    return _train(t, m, data=_jsonl(t / "n.jsonl", recs)), ["'content' is null"]


def case_unknown_chat_role(t, m, run):
    recs = [{"messages": [{"role": "narrator", "content": "hi"}, {"role": "assistant", "content": "x"}]}]
    return _train(t, m, data=_jsonl(t / "r.jsonl", recs)), ["narrator", "accepted"]


def case_truncated_adapter_weights(t, m, run):
    run = _copy_run(t, run)
    w = run / "adapter" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    return ["generate", str(run), "--prompt", "hi", "--max-new-tokens", "2"], ["adapter_model.safetensors"]


def case_adapter_config_not_json(t, m, run):
    run = _copy_run(t, run)
    (run / "adapter" / "adapter_config.json").write_bytes(b"\x00\xffnot json")
    return ["merge", str(run / "adapter"), "--out", str(t / "merged")], ["adapter_config.json"]


def case_damaged_gguf(t, m, run):
    g = _write(t / "m.gguf", "GGUF" + "\x03\x00\x00\x00" + "garbage" * 10)
    return ["generate", str(g), "--prompt", "hi"], ["GGUF"]


def case_config_of_binary_junk(t, m, run):
    p = t / "c.yaml"
    p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    return ["train", str(p)], ["c.yaml"]


def case_resume_a_finished_run(t, m, run):
    run = _copy_run(t, run)
    return ["train", str(run / "config.yaml"), "--resume", "--output_dir", str(run)], ["finished run"]


def case_inspect_data_of_a_missing_file(t, m, run):
    return ["inspect-data", "--model", str(m), "--data", str(t / "nope.jsonl")], ["nope.jsonl"]


def case_generate_from_an_empty_folder(t, m, run):
    (t / "empty").mkdir()
    return ["generate", str(t / "empty"), "--prompt", "hi"], ["config.json"]


def case_export_of_a_missing_source(t, m, run):
    return ["export", str(t / "nowhere"), "--out", str(t / "x.gguf")], ["nowhere"]


CASES = [v for k, v in sorted(globals().items()) if k.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_malformed_input_is_one_line_exit_2(case, tmp_path, tiny_llama_dir, trained, capsys, monkeypatch):
    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path / "cache"))  # a GGUF's conversion goes here
    argv, words = case(tmp_path, tiny_llama_dir, trained)
    rc = main(argv)
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.startswith("error")]
    assert rc == 2, out
    assert len(lines) == 1 and lines[0].startswith("error: ") and out.err.strip().endswith(lines[0]), out.err
    assert "Traceback" not in out.err + out.out
    for w in words:
        assert w.lower() in lines[0].lower(), (w, lines[0])
    if "non-empty reply" in words:
        assert "max_length" not in lines[0]  # the old advice, wrong for these
    assert not (tmp_path / "run" / "summary.json").exists() and not (tmp_path / "merged").exists()


def test_at_least_15_more_cases():
    assert len(CASES) >= 15
