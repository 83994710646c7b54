"""A method is one file plus its contract-table row: the toy in toy_method.py (config section, class,
format) goes through `leantune train`, `generate` and `merge` with no edit anywhere else in leantune.

Its section reaches the YAML and `train --help`; the trained run's adapter is written in the toy's own
format, `generate` loads it back through the registry, and `merge` folds it into a plain transformers
folder whose logits equal base + adapter.
"""

from __future__ import annotations

import json

import torch
import yaml
from transformers import AutoModelForCausalLM

from leantune.adapters.base import METHODS, adapter_modules, unload
from leantune.checkpoint.adapter_io import load_adapter
from leantune.cli.main import main

from . import toy_method

IDS = torch.tensor([[5, 17, 42, 99, 7, 230, 11, 64]])


def write_chat_data(path, n: int):
    words = ["fox", "dog", "sea", "paris", "step", "haiku"]
    with open(path, "w") as f:
        for k in range(n):
            q = f"{words[k % 6]} {words[(k * 5) % 6]}"
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": "the quick brown fox says " + q}]}) + "\n")
    return path


def train_args(model_dir, data, out, *extra):
    return ["train", "--model", str(model_dir), "--data.path", str(data), "--output_dir", str(out),
            "--train.progress", "false", "--train.tensorboard", "false", "--data.max_length", "64", *extra]


def test_the_toy_section_is_in_train_help(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "toy channel scaling (toy_scale.*)" in text and "--toy_scale.targets" in text and toy_method.NAME in text


def test_the_cli_trains_loads_and_merges_the_toy_method(tiny_llama_dir, tmp_path, capsys):
    data = write_chat_data(tmp_path / "d.jsonl", n=24)
    run = tmp_path / "run"
    assert main(train_args(tiny_llama_dir, data, run, "--method", toy_method.NAME, "--toy_scale.targets",
                          "[o_proj, down_proj]", "--train.max_steps", "8", "--train.lr", "5e-2", "--dtype", "fp32",
                          "--train.eval_every", "0")) == 0
    assert "trainable params: 256 " in capsys.readouterr().out  # 2 layers x (o_proj 64 + down_proj 64)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0]
    assert yaml.safe_load((run / "config.yaml").read_text())["toy_scale"]["targets"] == ["o_proj", "down_proj"]
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "TOY_SCALE"

    # generate: loads the run's adapter through the registry
    assert main(["generate", str(run), "--prompt", "the quick", "--max-new-tokens", "3", "--dtype", "fp32"]) == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    adapted = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    load_adapter(adapted, run / "adapter")
    assert {type(a) for a in adapter_modules(adapted).values()} == {METHODS[toy_method.NAME]}
    with torch.no_grad():
        expected = adapted(IDS).logits
        assert not torch.allclose(expected, base(IDS).logits, atol=1e-4)  # the trained scales act

    # merge: a plain transformers folder, base + adapter folded in
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, expected, rtol=0, atol=1e-5)
    folded = unload(adapted, merge=True)
    torch.testing.assert_close(merged.state_dict()["model.layers.0.self_attn.o_proj.weight"],
                               folded.state_dict()["model.layers.0.self_attn.o_proj.weight"], rtol=0, atol=0)
