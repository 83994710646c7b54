"""Every non-LoRA method through the CLI on the tiny Llama: it trains (the loss falls), saves its adapter,
resumes from a checkpoint, and `leantune generate` attaches the saved adapter and generates with it."""

from __future__ import annotations

import json

import pytest
import torch

from leantune.cli.main import main

from .test_train_cli import base_args, read_metrics, write_chat_data

METHODS = {"dora": [], "ia3": ["--train.lr", "5e-2"],
           "bottleneck": ["--bottleneck.size", "8", "--bottleneck.style", "pfeiffer"],
           "prompt": ["--prompt.virtual_tokens", "4", "--prompt.init", "text", "--prompt.init_text", "the fox",
                      "--train.lr", "5e-2"],
           "prefix": ["--prefix.virtual_tokens", "4", "--prefix.projection", "true", "--train.lr", "5e-3"]}


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_saves_and_generate_attaches_it(tiny_llama_dir, tmp_path, capsys, method):
    from leantune.adapters.base import ADAPTERS, adapter_modules, prepare_inputs
    from leantune.infer.generate import load_for_inference

    data = write_chat_data(tmp_path / "d.jsonl", n=24)
    out = tmp_path / "run"
    args = base_args(tiny_llama_dir, data, out, "--method", method, "--train.max_steps", "12", "--train.lr", "1e-2",
                     "--dtype", "fp32", "--train.eval_every", "0", *METHODS[method])
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "trainable params: " in printed
    assert ("data.packing is off" in printed) == (method in ("prompt", "prefix"))  # a notice, and the run goes on unpacked
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert sum(losses[-3:]) < sum(losses[:3])
    model, _ = load_for_inference(str(out), dtype="fp32", device="cpu")
    assert {type(a) for a in adapter_modules(model).values()} == {ADAPTERS[method]}
    base, _ = load_for_inference(str(out), dtype="fp32", use_adapter=False, device="cpu")
    ids = torch.tensor([[7, 8, 9, 10]])
    with_adapter = model(**prepare_inputs(model, {"input_ids": ids})).logits[:, -ids.shape[1]:]
    assert not torch.equal(with_adapter, base(ids).logits)  # the trained adapter is really on
    assert main(["generate", str(out), "--prompt", "the quick", "--max-new-tokens", "4", "--dtype", "fp32"]) == 0


def test_resume_restores_a_dora_run_exactly(tiny_llama_dir, tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=24)
    whole, split = tmp_path / "whole", tmp_path / "split"
    extra = ["--method", "dora", "--train.max_steps", "4", "--train.save_every", "2", "--dtype", "fp32",
             "--train.eval_every", "0"]
    assert main(base_args(tiny_llama_dir, data, whole, *extra)) == 0
    from leantune.train import loop
    from leantune.config import load as load_config

    cfg = load_config(None, {"model": str(tiny_llama_dir), "data.path": str(data), "output_dir": str(split),
                             "train.progress": False, "train.tensorboard": False, "lora.rank": 4, "lora.alpha": 8,
                             "data.max_length": 64, "method": "dora", "train.max_steps": 4, "train.save_every": 2,
                             "dtype": "fp32", "train.eval_every": 0})
    loop.run(cfg, stop_after=2, console=lambda s: None)
    loop.run(cfg, resume=True, console=lambda s: None)
    from safetensors.torch import load_file

    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(split / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(k.endswith("lora_magnitude_vector") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((split / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
