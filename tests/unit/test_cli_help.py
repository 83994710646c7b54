"""The CLI's help and usage errors read as written for people: every subcommand's --help renders its own text
(no argparse internals), and a mistyped flag is answered by the subcommand it was given to."""

from __future__ import annotations

import argparse

import pytest

from leantune.cli.main import build_parser, main


def subcommands() -> list[str]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


@pytest.mark.parametrize("command", subcommands())
def test_every_subcommand_help_renders_without_internals(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "option_strings" not in text and "cfg:" not in text.lower(), text
    assert text.startswith("usage: leantune " + command)


def test_train_help_names_every_method_not_only_lora(capsys):
    main(["train", "--help"])
    text = capsys.readouterr().out
    for method in ("DoRA", "IA3", "prompt", "prefix", "bottleneck", "full", "QLoRA"):
        assert method in text
    assert "~30% slower" in text  # a percent sign in a field's help is text, not a format


def test_a_mistyped_flag_points_to_the_subcommands_help_and_its_closest_option(capsys):
    assert main(["train", "--lora.rnk", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unrecognized arguments: --lora.rnk (did you mean --lora.rank?); see `leantune train --help`"
    assert main(["export", "x", "--lora.rank", "8"]) == 2
    err = capsys.readouterr().err
    assert "see `leantune export --help`" in err and "did you mean --lora" not in err


@pytest.mark.parametrize("command", ["merge", "export"])
def test_merge_and_export_name_the_qlora_base_choice_alike(command, capsys):
    """`--merge-base` in both; merge's earlier `--base` still sets it but is no longer listed."""
    parser = build_parser()
    assert parser.parse_args([command, "run"]).merge_base == "dequantized"
    assert parser.parse_args([command, "run", "--merge-base", "original"]).merge_base == "original"
    assert main([command, "--help"]) == 0
    assert "--merge-base {dequantized,original}" in capsys.readouterr().out


def test_merge_base_keeps_its_earlier_name_as_a_hidden_alias(capsys, tmp_path, monkeypatch):
    """Merge's earlier `--base dequantized|original` still sets --merge-base; any other value (or a folder of
    that name) is the base model, as `--base` is in export and generate; `--base-model` stays accepted."""
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    ns = parser.parse_args(["merge", "run", "--base", "original"])
    assert ns.merge_base == "original" and ns.base_model is None
    assert parser.parse_args(["merge", "run", "--base", "./base"]).base_model == "./base"
    assert parser.parse_args(["merge", "run", "--base-model", "b"]).base_model == "b"
    (tmp_path / "original").mkdir()
    ns = parser.parse_args(["merge", "run", "--base", "original"])
    assert ns.base_model == "original" and ns.merge_base == "dequantized"
    assert main(["merge", "--help"]) == 0
    text = capsys.readouterr().out
    assert "--base BASE" in text and "--base-model" not in text
