"""`leantune --help` stays fast: the CLI module and config import nothing heavy."""

import subprocess
import sys


def test_cli_help_imports_no_heavy_library():
    code = ("import sys; from leantune.cli.main import build_parser; build_parser().format_help(); "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'safetensors', 'datasets') if m in sys.modules]; "
            "print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"imported at --help time: {out}"


def test_train_help_lists_examples(capsys):
    from leantune.cli.main import main

    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "leantune train my.yaml" in text and "--resume" in text
