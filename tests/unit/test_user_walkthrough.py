"""What a new user ran into walking the README and `--help`: each case once broke or misled."""

from __future__ import annotations

import pytest

from leantune.cli.main import main
from tests.conftest import assert_one_line_error


@pytest.mark.parametrize("flag, value, words", [
    ("--max-new-tokens", "0", ["--max-new-tokens", ">= 1"]),
    ("--max-new-tokens", "-1", ["--max-new-tokens", ">= 1"]),
    ("--temperature", "-0.5", ["--temperature", ">= 0"]),
    ("--temperature", "nan", ["--temperature", ">= 0"]),
    ("--top-p", "0", ["--top-p", "(0, 1]"]),
    ("--top-p", "1.5", ["--top-p", "(0, 1]"]),
])
def test_generate_refuses_out_of_range_sampling_options_before_loading(flag, value, words, tmp_path, capsys):
    """A negative token count was a transformers traceback after the model loaded; a negative temperature silently
    ran greedy. Both are now a usage error naming the range (the source does not even need to exist)."""
    assert main(["generate", str(tmp_path / "no-such-run"), "--prompt", "hi", flag, value]) == 2
    assert_one_line_error(capsys.readouterr(), words)


def test_preprocess_prints_the_cache_path_whole(tmp_path, tiny_llama_dir, capsys):
    """The summary was wrapped inside the cache file's path (at its hyphen and mid-word), so the printed path
    could not be copied."""
    from data_helpers import alpaca, write_jsonl

    data = write_jsonl(tmp_path / "train-set.jsonl", alpaca(8))
    cache = tmp_path / "a-long-cache-folder-name-that-goes-past-the-line-width" / "data"
    assert main(["preprocess", "--model", str(tiny_llama_dir), "--data", data, "--cache-dir", str(cache)]) == 0
    [written] = cache.rglob("*.safetensors")
    assert str(written) in capsys.readouterr().out


def test_plan_prints_a_small_models_step_flops_in_a_unit_that_shows_them(tiny_llama_dir, tmp_path, capsys):
    """A tiny model's step was printed as '0.0 TFLOP per optimizer step'; the figure now reads back to the JSON's."""
    import json
    import re

    cfg = tmp_path / "my.yaml"
    cfg.write_text(f"model: {tiny_llama_dir}\ndata: {{max_length: 64}}\ntrain: {{batch_size: 2}}\n")
    assert main(["plan", str(cfg), "--gpu", "8GB", "--json"]) == 0
    flops = json.loads(capsys.readouterr().out)["recommendation"]["flops"]
    assert 0 < flops < 1e11
    assert main(["plan", str(cfg), "--gpu", "8GB"]) == 0
    value, unit = re.search(r"step: ([\d.]+) (\w)FLOP per optimizer step", capsys.readouterr().out).groups()
    scale = {"P": 1e15, "T": 1e12, "G": 1e9, "M": 1e6}[unit]
    assert float(value) * scale == pytest.approx(flops, rel=0.06)


def test_merge_takes_the_base_model_as_base_like_export(tiny_llama_dir, tmp_path, capsys):
    """`--base ./folder` names the base model in export and generate; merge refused it ('invalid choice')
    because there it was the hidden old name of --merge-base. Now it merges onto that folder."""
    import shutil

    from tests.e2e.test_train_cli import base_args, write_chat_data

    base = shutil.copytree(tiny_llama_dir, tmp_path / "moved-base")
    run = tmp_path / "run"
    assert main(base_args(base, write_chat_data(tmp_path / "d.jsonl", n=16), run, "--train.max_steps", "1")) == 0
    shutil.move(base, tmp_path / "base-elsewhere")  # the folder the adapter records is gone
    capsys.readouterr()
    assert main(["merge", str(run), "--out", str(tmp_path / "merged"), "--base", str(tmp_path / "base-elsewhere")]) == 0
    out = capsys.readouterr()
    assert f"into {tmp_path / 'base-elsewhere'}" in out.out + out.err
    assert (tmp_path / "merged" / "config.json").is_file()


def test_ctrl_c_in_the_fidelity_check_says_the_export_itself_is_complete(tiny_llama_dir, tmp_path, capsys,
                                                                         monkeypatch):
    """Ctrl-C after the GGUF was written but before its fidelity report printed only 'interrupted', leaving a
    file that looks finished beside no report, and a rerun that refuses it without saying why."""
    from leantune.export import fidelity

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fidelity, "model_scores", interrupted)
    out = tmp_path / "m.gguf"
    assert main(["export", str(tiny_llama_dir), "--quant", "F32", "--out", str(out), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert out.is_file() and not fidelity.report_path(out, ".gguf").exists()
    assert f"{out} is complete" in err and "--overwrite" in err


def test_export_help_names_every_format_and_what_all_writes(capsys):
    """`export --help` said GGUF or INT8, and that --all writes GGUF and INT8 only; --all writes GPTQ and AWQ too."""
    from leantune.export.base import BUILTIN_QUANTS  # the built-in formats (a test may register a toy one)
    from leantune.export.run import all_plan

    assert main(["--help"]) == 0
    top = " ".join(capsys.readouterr().out.split())
    assert main(["export", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name in BUILTIN_QUANTS:
        assert name.upper() in top and name.upper() in text.split("positional arguments")[0], name
    every = text.split("--all every format (")[1].split(")")[0]
    for name, quant, _, _ in all_plan():
        if name not in BUILTIN_QUANTS:
            continue
        assert f"{name} " in every and quant in every, (name, quant, every)


@pytest.mark.parametrize("ppl, delta", [(14.2, 5.8), (1.4664e10, 4.6), (3.2e6, 2.5e7), (float("inf"), float("inf"))])
def test_export_all_table_keeps_a_large_perplexity_in_its_column(ppl, delta):
    """An untrained model's perplexity (1.47e10) printed as '13.6614664793217.141': bits/w and ppl ran together."""
    from leantune.export import fidelity

    report = {"file_bytes": 64e6, "bits_per_weight": 13.66, "export_seconds": 1.9, "peak_rss_bytes": 0.76 * 2**30,
              "model": {"perplexity_export": ppl, "perplexity_delta_pct": delta, "kl_mean": 2.45e-2,
                        "top1_agreement": 0.881}}
    fields = fidelity.table_row("awq", "GEMM", report, "ok").split()
    assert len(fields) == 11 and fields[-1] == "ok"
    assert float(fields[3]) == pytest.approx(13.66)
    assert float(fields[4]) == pytest.approx(ppl, rel=1e-2) and float(fields[5]) == pytest.approx(delta, rel=1e-2)


@pytest.mark.parametrize("flag, value", [("--steps", "0"), ("--steps", "-2"), ("--layers", "0"), ("--layers", "-1")])
def test_demo_refuses_a_count_below_one_before_it_starts(flag, value, capsys):
    """`demo --steps 0` read 0 as unset and ran the whole tuned demo; --steps -2 failed after minutes of
    questions to the base model."""
    from leantune.cli.main import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", flag, value])
    assert ">= 1" in capsys.readouterr().err


def test_demo_checks_its_output_folder_and_layer_count_before_the_model(tmp_path, tiny_llama_dir, capsys,
                                                                        monkeypatch):
    """A folder of the user's was refused only after the model conversion (~40 s the first time), and a
    --layers past the model's depth was an error from an internal helper naming a cache hash."""
    import leantune.demo as demo

    def no_conversion():
        raise AssertionError("the model was converted before the output folder was checked")

    monkeypatch.setattr(demo, "demo_model_dir", no_conversion)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    assert main(["demo", "--output-dir", str(mine), "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr(), ["not an earlier demo run"])
    assert (mine / "notes.txt").read_text() == "the user's"

    monkeypatch.setattr(demo, "demo_model_dir", lambda: tiny_llama_dir)
    assert main(["demo", "--output-dir", str(tmp_path / "d"), "--layers", "5", "--quiet"]) == 2
    assert_one_line_error(capsys.readouterr(), ["--layers must be in 1..2"])


def test_inspect_data_and_preprocess_take_trains_data_flags(tmp_path, tiny_llama_dir, capsys):
    """`inspect-data --data.path FILE` (the spelling `train` uses) was 'unrecognized arguments'."""
    from data_helpers import alpaca, write_jsonl

    data = write_jsonl(tmp_path / "t.jsonl", alpaca(8))
    assert main(["inspect-data", "--model", str(tiny_llama_dir), "--data.path", data, "--data.max_length", "64",
                 "-n", "1"]) == 0
    assert "8 records" in capsys.readouterr().out
    assert main(["preprocess", "--model", str(tiny_llama_dir), "--data.path", data, "--data.format", "alpaca",
                 "--data.cache_dir", str(tmp_path / "cache")]) == 0
    assert list((tmp_path / "cache").rglob("*.safetensors"))


def test_tokenizing_a_dataset_that_takes_a_while_shows_progress(tmp_path, capsys, monkeypatch):
    """27,900 records tokenized for a minute and a half with nothing on the screen; past a short delay a bar
    now counts the records."""
    from conftest import build_tokenizer
    from data_helpers import alpaca, write_jsonl

    from leantune.config import DataConfig
    from leantune.data import dataset

    monkeypatch.setattr(dataset, "PROGRESS_DELAY_S", 0.0)  # as if the data were large
    dataset.build(DataConfig(path=write_jsonl(tmp_path / "t.jsonl", alpaca(40))), build_tokenizer(), seed=0)
    err = capsys.readouterr().err
    assert "tokenizing data.path" in err and "/40 " in err


def test_a_resume_that_changes_the_schedule_says_so(tiny_llama_dir, tmp_path, capsys):
    """`train runs/x/config.yaml --resume --max-steps 25` on a 200-step run silently recomputed the cosine
    schedule: the rate jumped from 2.0e-4 to 1.4e-4 between two steps."""
    import shutil

    from tests.e2e.test_train_cli import base_args, write_chat_data

    run = tmp_path / "run"
    args = base_args(tiny_llama_dir, write_chat_data(tmp_path / "d.jsonl", n=16), run, "--train.save_every", "2")
    assert main([*args, "--train.max_steps", "4"]) == 0

    def stop_before_the_end(last: int) -> None:  # as if killed after the checkpoint before step `last`
        (run / "summary.json").unlink()
        shutil.rmtree(run / "checkpoints" / f"step-{last:06d}")

    stop_before_the_end(4)
    capsys.readouterr()
    assert main(["train", str(run / "config.yaml"), "--resume", "--train.max_steps", "5"]) == 0
    assert "warning: resuming with train.max_steps 5 (was 4)" in capsys.readouterr().out
    stop_before_the_end(5)
    assert main(["train", str(run / "config.yaml"), "--resume"]) == 0
    assert "warning: resuming" not in capsys.readouterr().out
