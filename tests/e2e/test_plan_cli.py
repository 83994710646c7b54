"""`leantune plan` end to end: the table from a config.json, a YAML config or a model folder; JSON; --fit;
and bad input answered in one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from leantune.cli.main import main

CONFIGS = Path(__file__).parent.parent / "plan_configs"


def test_table_for_a_public_config(capsys):
    assert main(["plan", str(CONFIGS / "Mistral-7B-v0.1.json"), "--gpu", "RTX 4090", "--seq", "2048", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert "Mistral-7B-v0.1 (mistral, 7.24B parameters" in out
    for row in ("full", "full + GaLore", "LoRA", "QLoRA nf4 + dq", "DoRA", "IA3", "bottleneck", "prefix", "prompt"):
        assert f"\n{row} " in out, row
    assert "recommended:" in out and "outside the step:" in out and "4-bit's price" in out


def test_seed_claim_70b_qlora_fits_one_48gb_gpu(capsys):
    """The seeds' figure: QLoRA fine-tunes a 70B model on one 48 GB GPU (here at batch 1 x 512 tokens)."""
    assert main(["plan", str(CONFIGS / "Llama-3.1-70B.json"), "--gpu", "RTX A6000", "--seq", "512", "--batch", "1",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    rec = plan["recommendation"]
    assert rec["setup"]["quant"] == 4 and rec["fits"]
    lora16 = [r for r in plan["rows"] if r["setup"]["label"] == "LoRA"]
    assert not any(r["fits"] for r in lora16)  # a 16-bit 70B base alone is 131 GiB


def test_yaml_config_supplies_model_seq_batch_and_fit_prints_flags(tiny_llama_dir, tmp_path, capsys):
    cfg = tmp_path / "my.yaml"
    cfg.write_text(f"model: {tiny_llama_dir}\nmethod: lora\ndata: {{max_length: 96}}\ntrain: {{batch_size: 3}}\n")
    assert main(["plan", str(cfg), "--gpu", "8GB", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert (plan["seq"], plan["batch"]) == (96, 3)
    assert main(["plan", str(cfg), "--gpu", "8GB", "--fit"]) == 0
    assert f"fit: leantune train {cfg} --method lora --train.batch_size 3" in capsys.readouterr().out


@pytest.mark.parametrize("args,message", [
    (["--gpu", "RTX 4909"], "did you mean 'RTX 4090'"),
    (["--seq", "0"], "--seq must be > 0"),
    (["--batch", "0"], "--batch must be > 0"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert main(["plan", str(CONFIGS / "Llama-3.1-8B.json"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_config_without_the_needed_fields(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "vocab_size": 0, "num_hidden_layers": 0}))
    assert main(["plan", str(bad), "--gpu", "24GB"]) == 2
    err = capsys.readouterr().err
    assert "lacks" in err and err.count("\n") == 1


def test_hub_id_offline_fails_in_one_line(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["plan", "some-org/some-model-not-cached", "--gpu", "24GB"]) == 2
    err = capsys.readouterr().err
    assert "offline" in err and err.count("\n") == 1
