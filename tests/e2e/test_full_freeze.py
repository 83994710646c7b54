"""method full and method freeze through the CLI: the weights that should train do, the rest stay bit
for bit, the output is an HF folder that from_pretrained loads and `leantune generate` runs; freezing more
layers than the model has is an error before training."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from leantune.cli.main import main

from .test_train_cli import base_args, read_metrics, write_chat_data


@pytest.fixture
def data(tmp_path):
    return write_chat_data(tmp_path / "d.jsonl", n=24)


def weights(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def train(tiny_llama_dir, data, out, *extra):
    return main(base_args(tiny_llama_dir, data, out, "--dtype", "fp32", "--train.max_steps", "8",
                          "--train.lr", "1e-3", "--train.eval_every", "0", *extra))


def test_full_trains_every_weight_and_saves_a_loadable_model(tiny_llama_dir, data, tmp_path, capsys):
    out = tmp_path / "full"
    assert train(tiny_llama_dir, data, out, "--method", "full") == 0
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert sum(losses[-3:]) < sum(losses[:3])
    before, after = weights(tiny_llama_dir), weights(out / "model")
    assert before.keys() == after.keys()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert AutoTokenizer.from_pretrained(out / "model").chat_template
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == str(out / "model") and "adapter" not in summary
    assert not (out / "adapter").exists()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "the quick", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()


def test_freeze_trains_only_the_last_layer_and_named_modules(tiny_llama_dir, data, tmp_path):
    out = tmp_path / "freeze"
    assert train(tiny_llama_dir, data, out, "--method", "freeze", "--freeze.train_last_layers", "1",
                 "--freeze.train_modules", "model.norm") == 0
    before, after = weights(tiny_llama_dir), weights(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    expected = {k for k in before if k.startswith("model.layers.1.") or k == "model.norm.weight"}
    assert changed == expected


def test_freeze_more_layers_than_the_model_has_fails_before_training(tiny_llama_dir, data, tmp_path, capsys):
    out = tmp_path / "too-many"
    assert train(tiny_llama_dir, data, out, "--method", "freeze", "--freeze.train_last_layers", "5") == 2
    err = capsys.readouterr().err
    assert "train_last_layers is 5" in err and "2 decoder layers" in err and "use 1-2" in err
    assert not (out / "metrics.jsonl").exists()


def test_freeze_module_that_matches_nothing_names_the_modules(tiny_llama_dir, data, tmp_path, capsys):
    assert train(tiny_llama_dir, data, tmp_path / "typo", "--method", "freeze",
                 "--freeze.train_modules", "nrom") == 2
    err = capsys.readouterr().err
    assert "'nrom' matches no module" in err and "norm" in err


def test_freeze_with_nothing_to_train_is_a_config_error(tiny_llama_dir, data, tmp_path, capsys):
    assert train(tiny_llama_dir, data, tmp_path / "none", "--method", "freeze") == 2
    assert "freeze.train_last_layers" in capsys.readouterr().err


@pytest.mark.parametrize("extra,message", [({"quant": {"bits": 4}}, "4-bit base cannot hold"),
                                           ({"lora": {"lr_ratio": 16}}, "which method full does not have")])
def test_full_refuses_settings_that_only_mean_something_for_lora(extra, message):
    from leantune.config import from_dict
    from leantune.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        from_dict({"model": "m", "data": {"path": "d"}, "method": "full", **extra})


@pytest.mark.parametrize("method", [["full"], ["freeze", "--freeze.train_last_layers", "1"]], ids=["full", "freeze"])
def test_gradient_checkpointing_applies_to_whole_model_methods(tiny_llama_dir, data, tmp_path, method):
    """train.gradient_checkpointing used to be dropped for full/freeze: the same run with it on saves far less."""
    saved = {}
    for ckpt in ("false", "true"):
        out = tmp_path / f"{method[0]}-{ckpt}"
        assert train(tiny_llama_dir, data, out, "--method", *method, "--train.max_steps", "2",
                     "--train.gradient_checkpointing", ckpt) == 0
        saved[ckpt] = json.loads((out / "summary.json").read_text())["memory"]["mem_activations_bytes"]
    assert saved["true"] < 0.5 * saved["false"], saved
