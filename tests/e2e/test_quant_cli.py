"""QLoRA through the CLI on the tiny Llama: `train --quant.bits 4` lowers the loss and `generate` runs
on the quantized base; asking for what cannot run (no bitsandbytes, fp16 compute on CPU, 3 bits) is a
one-line error with exit code 2."""

from __future__ import annotations

import builtins
import json

import pytest

from leantune.cli.main import main

from .test_train_cli import base_args, read_metrics, write_chat_data


def test_qlora_run_lowers_the_loss_and_generate_uses_the_4bit_base(tiny_llama_dir, tmp_path, capsys):
    data = write_chat_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    rc = main(base_args(tiny_llama_dir, data, out, "--quant.bits", "4", "--train.max_steps", "30", "--train.lr",
                        "1e-2", "--train.eval_every", "0", "--dtype", "fp32", "--train.gradient_checkpointing", "true"))
    assert rc == 0
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    assert "quantizing the base to 4 bits" in capsys.readouterr().out
    saved = (out / "config.yaml").read_text()
    assert "bits: 4" in saved and "type: nf4" in saved
    assert json.loads((out / "summary.json").read_text())["steps"] == 30

    assert main(["generate", str(out), "--prompt", "the quick", "--max-new-tokens", "4", "--dtype", "fp32"]) == 0
    assert "4-bit base" in capsys.readouterr().err


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    return err


def test_4bit_without_bitsandbytes_is_a_one_line_error(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    rc = main(base_args(tiny_llama_dir, data, tmp_path / "run", "--quant.bits", "4", "--train.max_steps", "1"))
    assert rc == 2
    err = _one_line_error(capsys)
    assert "bitsandbytes" in err and "quant.bits: null" in err and "pip install" in err


@pytest.mark.parametrize("override, expected", [
    (["--quant.compute_dtype", "fp16"], "use quant.compute_dtype bf16 or fp32"),
    (["--quant.bits", "3"], "quant.bits must be 4 or 8"),
    (["--quant.blocksize", "48"], "quant.blocksize must be one of"),
])
def test_bad_quant_settings_exit_2_naming_the_alternative(tiny_llama_dir, tmp_path, capsys, override, expected):
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    args = ["--quant.bits", "4", *override] if override[0] != "--quant.bits" else override
    rc = main(base_args(tiny_llama_dir, data, tmp_path / "run", *args, "--train.max_steps", "1", "--device", "cpu"))
    assert rc == 2
    assert expected in _one_line_error(capsys)


def test_hf_quantization_keys_in_a_config_name_the_leantune_key(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: m\ndata: {path: d.jsonl}\nload_in_4bit: true\n")
    assert main(["train", str(cfg)]) == 2
    assert "quant.bits: 4" in _one_line_error(capsys)


def test_train_help_lists_every_quant_field(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for field in ("--quant.bits", "--quant.type", "--quant.double_quant", "--quant.compute_dtype", "--quant.blocksize"):
        assert field in text
