"""`leantune serve` before anything loads: which runs become model names, how the base is chosen, and the
one-line refusals (a port in use exits 2 before the model loads; sources that disagree on the base)."""

from __future__ import annotations

import json
import socket

import pytest

from leantune.cli.main import main
from leantune.errors import ConfigError
from leantune.serve.server import plan


def _run(root, name, base, finished=True):
    run = root / name
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: {base}\n")
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
