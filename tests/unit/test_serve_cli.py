"""`leantune serve` before anything loads: which runs become model names, how the base is chosen, and the
one-line refusals (a port in use exits 2 before the model loads; sources that disagree on the base)."""

from __future__ import annotations

import json
import socket

import pytest
from conftest import assert_one_line_error

from leantune.cli.main import main
from leantune.errors import ConfigError
from leantune.serve.server import base_quant, plan


def _run(root, name, base, finished=True, quant: str = ""):
    run = root / name
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {base}\n" + (f"quant: {quant}\n" if quant else ""))
    (run / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": str(base)}))
    if finished:
        (run / "summary.json").write_text("{}")
    return run


def test_every_finished_run_under_adapters_is_a_model_name(tmp_path, tiny_llama_dir):
    runs = tmp_path / "runs"
    _run(runs, "legal", tiny_llama_dir)
    _run(runs, "support", tiny_llama_dir)
    _run(runs, "half", tiny_llama_dir, finished=False)
    p = plan([str(tiny_llama_dir)], str(runs))
    assert p.base == str(tiny_llama_dir) and sorted(p.adapters) == ["legal", "support"]
    assert p.adapter_root == runs


def test_run_folders_alone_name_their_base_and_adapters(tmp_path, tiny_llama_dir):
    a, b = _run(tmp_path, "a", tiny_llama_dir), _run(tmp_path, "b", tiny_llama_dir)
    p = plan([str(a), f"other={b / 'adapter'}"])
    assert p.base == str(tiny_llama_dir) and set(p.adapters) == {"a", "other"}
    c = _run(tmp_path, "c", tmp_path / "another-base")
    with pytest.raises(ConfigError, match="2 different bases.*--base"):
        plan([str(a), str(c)])


def test_port_in_use_exits_2_with_one_line(tmp_path, tiny_llama_dir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(tiny_llama_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"127.0.0.1:{port}" in err[0] and "--port" in err[0]


def test_engine_vllm_prints_the_vllm_command_for_the_same_adapters(tmp_path, tiny_llama_dir, capsys):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    peft.save_pretrained(tmp_path / "legal")
    assert main(["serve", f"legal={tmp_path / 'legal'}", "--base", str(tiny_llama_dir), "--engine", "vllm",
                 "--print"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("vllm serve") and "--enable-lora" in line and "legal=" in line
    assert "--max-lora-rank 8" in line  # the smallest rank vLLM accepts that holds r=8

    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    peft.save_pretrained(tmp_path / "dora")
    assert main(["serve", f"dora={tmp_path / 'dora'}", "--base", str(tiny_llama_dir), "--engine", "vllm"]) == 2
    assert "DoRA" in capsys.readouterr().err


def test_a_qlora_run_is_served_over_its_own_quantization_unless_told_otherwise(tmp_path, tiny_llama_dir):
    q = _run(tmp_path, "q", tiny_llama_dir, quant="{bits: 4, type: fp4, double_quant: false}")
    chosen = base_quant(plan([str(q)]))
    assert (chosen.quant.bits, chosen.quant.type, chosen.quant.double_quant) == (4, "fp4", False)
    assert "as run q trained over it (QLoRA)" in chosen.why and "--quant-bits none" in chosen.why
    assert base_quant(plan([str(q)]), "none").quant is None
    assert base_quant(plan([str(q)]), None, "nf4").quant.type == "nf4"
    assert base_quant(plan([str(q)]), "8").quant.bits == 8
    plain = _run(tmp_path, "plain", tiny_llama_dir)
    assert base_quant(plan([str(plain)])).quant is None                 # a 16-bit run: a 16-bit base
    assert base_quant(plan([str(plain)]), "4").quant.type == "nf4"       # quant's own defaults
    assert base_quant(plan([str(q), str(plain)]), "4").quant.type == "fp4"   # the QLoRA run's settings


def test_runs_over_different_bases_and_bad_quant_options_are_one_line_exit_2(tmp_path, tiny_llama_dir, capsys):
    q = _run(tmp_path, "q", tiny_llama_dir, quant="{bits: 4}")
    q8 = _run(tmp_path, "q8", tiny_llama_dir, quant="{bits: 8}")
    plain = _run(tmp_path, "plain", tiny_llama_dir)
    with pytest.raises(ConfigError, match="q: 4-bit nf4, double quant, q8: 8-bit .*--quant-bits 4, 8 or none"):
        base_quant(plan([str(q), str(q8)]))
    with pytest.raises(ConfigError, match="plain: 16-bit"):
        base_quant(plan([str(q), str(plain)]))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    cases = [([str(q), str(plain)], ["different bases", "--quant-bits"]),
             ([str(q), "--quant-bits", "8", "--quant-type", "fp4"], ["--quant-type", "4-bit"]),
             ([str(plain), "--quant-type", "fp4"], ["--quant-type needs --quant-bits 4"]),
             ([str(q), "--quant-bits", "3"], ["--quant-bits", "invalid choice"]),
             ([str(q), "--quant-type", "int4"], ["--quant-type", "invalid choice"])]
    for args, words in cases:
        assert main(["serve", *args, "--port", port]) == 2
        assert_one_line_error(capsys.readouterr(), words)
