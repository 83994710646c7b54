"""`leantune train --help` lists every method's section without importing the methods (torch): from a
light table that must say what the registry says."""

from __future__ import annotations

import json
import subprocess
import sys

import leantune.adapters  # noqa: F401  (registers every built-in method)
from leantune.cli.method_help import TABLE, live_table


def test_the_help_table_is_what_the_registry_says():
    assert json.loads(TABLE.read_text(encoding="utf-8")) == live_table(), (
        "leantune/assets/method_help.json is stale: run `python -m leantune.cli.method_help`")


def test_train_help_shows_every_method_section_without_importing_torch():
    code = ("import sys; from leantune.cli.main import main; rc = main(['train', '--help']); "
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("NO-TORCH")
    for f in live_table()["fields"]:
        assert f"--{f['name']}" in out, f["name"]
    assert "LoRA and DoRA (lora.*)" in out and "{lora,dora,ia3,bottleneck,prompt,prefix,full,freeze}" in out
