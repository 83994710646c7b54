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
