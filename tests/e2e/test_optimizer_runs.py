"""Optimizers through the loop: an 8-bit AdamW run killed after a checkpoint resumes to the adapter of
an uninterrupted run (its quantized state comes back from a weights_only checkpoint); every run records
its memory breakdown."""

from __future__ import annotations

import json

import torch

from leantune.config import from_dict
from leantune.train.loop import run

from .test_loop_behaviour import adapter, quiet
from .test_train_cli import write_chat_data


def cfg_8bit(model_dir, data, out):
    # rank 64 on hidden 64: lora_A holds 4096 values, so bitsandbytes keeps its moments in 8 bits
    return from_dict({"model": str(model_dir), "output_dir": str(out), "dtype": "fp32",
                      "data": {"path": str(data), "max_length": 64}, "lora": {"rank": 64, "alpha": 64},
                      "train": {"max_steps": 5, "batch_size": 2, "lr": 3e-3, "progress": False, "tensorboard": False,
                                "save_every": 2, "eval_every": 0, "optimizer": "adamw_8bit"}})


def test_adamw_8bit_resume_equals_an_uninterrupted_run(tiny_llama_dir, tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=24)
    out = tmp_path / "killed"
    res = run(cfg_8bit(tiny_llama_dir, data, out), console=quiet, stop_after=3)  # dies after step 3
    assert res.stopped == "interrupted"
    opt_state = torch.load(out / "checkpoints" / "step-000002" / "optimizer.pt", weights_only=True)
    # bitsandbytes nests the quantized tensors of each parameter under one key
    quant = [s["__bnb_optimizer_quant_state__"] for s in opt_state["state"].values()]
    assert any(q["state1"].dtype == torch.uint8 for q in quant)
    run(cfg_8bit(tiny_llama_dir, data, out), resume=True, console=quiet)
    run(cfg_8bit(tiny_llama_dir, data, tmp_path / "ref"), console=quiet)
    a, b = adapter(out), adapter(tmp_path / "ref")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_run_records_the_breakdown_in_metrics_and_summary(tiny_llama_dir, tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    cfg = from_dict({"model": str(tiny_llama_dir), "output_dir": str(tmp_path / "r"), "dtype": "fp32",
                     "data": {"path": str(data), "max_length": 64}, "lora": {"rank": 4, "alpha": 8},
                     "train": {"max_steps": 2, "batch_size": 2, "progress": False, "tensorboard": False,
                               "eval_every": 0}})
    lines = []
    run(cfg, console=lines.append)
    mem = json.loads((tmp_path / "r" / "summary.json").read_text())["memory"]
    records = [json.loads(ln) for ln in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if "mem_optimizer_state_bytes" in r)
    assert first["step"] == 1 and all("peak_memory_mib" in r for r in records if "loss" in r)
    assert mem["mem_gradients_bytes"] == mem["mem_trainable_bytes"] > 0  # fp32 grads of fp32 LoRA params
    assert mem["mem_optimizer_state_bytes"] >= 2 * mem["mem_trainable_bytes"]
    assert mem["mem_activations_bytes"] > 0
    parts = sum(mem[f"mem_{k}_bytes"] for k in ("base_weights", "trainable", "gradients", "optimizer_state"))
    assert mem["mem_peak_bytes"] > parts
    assert any(ln.startswith("memory: peak") for ln in lines)


def test_full_fine_tuning_with_galore_lowers_the_loss(tiny_llama_dir, tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl", n=24)
    cfg = from_dict({"model": str(tiny_llama_dir), "output_dir": str(tmp_path / "g"), "dtype": "fp32",
                     "method": "full", "data": {"path": str(data), "max_length": 64},
                     "galore": {"rank": 8, "update_proj_gap": 4, "scale": 0.25},
                     "train": {"max_steps": 10, "batch_size": 2, "lr": 1e-2, "progress": False, "tensorboard": False,
                               "eval_every": 0, "optimizer": "galore_adamw", "schedule": "constant"}})
    run(cfg, console=quiet)
    records = [json.loads(ln) for ln in (tmp_path / "g" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3])
    mem = json.loads((tmp_path / "g" / "summary.json").read_text())["memory"]
    assert mem["mem_optimizer_state_bytes"] < 2 * mem["mem_trainable_bytes"]  # AdamW would hold 2x
