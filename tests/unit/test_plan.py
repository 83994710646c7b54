"""The planner: parameter counts from config.json alone equal the published sizes; what it says each method
trains equals a real attach on a real model; its per-component prediction for a tiny CPU run matches the
run's own measured breakdown (summary.json)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from leantune.errors import ConfigError
from leantune.plan import Setup, estimate, parse_gpu, read_config, shape_of, trainable_of
from leantune.plan.estimate import optimizer_bytes

CONFIGS = Path(__file__).parent.parent / "plan_configs"

# Published sizes (the model cards' parameter counts), in billions.
PUBLISHED = {"Llama-3.1-8B": 8.03, "Qwen2.5-7B": 7.62, "Mistral-7B-v0.1": 7.24, "Gemma-2-9B": 9.24,
             "Llama-3.1-70B": 70.6}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_from_config_equals_published_size(name):
    shape = shape_of(read_config(CONFIGS / f"{name}.json"), name)
    assert shape.total_params / 1e9 == pytest.approx(PUBLISHED[name], rel=0.005)


def test_llama_8b_linear_weights_are_what_a_4bit_base_quantizes():
    shape = shape_of(read_config(CONFIGS / "Llama-3.1-8B.json"))
    # 32 layers x (q 4096^2 + k,v 1024x4096 + o 4096^2 + 3 x 4096x14336); embeddings and head stay 16-bit
    per_layer = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336
    assert shape.linear_params == 32 * per_layer
    assert shape.linear_layers == 32 * 7 and not shape.tied


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bottleneck", "prompt", "prefix", "full"])
def test_trainable_count_equals_a_real_attach(tiny_llama_dir, method):
    """The planner attaches on the meta device; a run attaches on real weights. Same count."""
    from transformers import AutoModelForCausalLM

    from leantune import adapters  # noqa: F401  (registers every method)
    from leantune.adapters.base import ADAPTERS, count_parameters, mark_only_adapters_trainable
    from leantune.config import RunConfig

    planned = trainable_of(read_config(tiny_llama_dir), method).count
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    cfg = RunConfig()
    if method == "full":
        model.requires_grad_(True)
    else:
        ADAPTERS[method].attach(model, getattr(cfg, ADAPTERS[method].config_section))
        mark_only_adapters_trainable(model)
    assert planned == count_parameters(model)[0] > 0


def test_4bit_weights_count_the_block_statistics():
    shape = shape_of(read_config(CONFIGS / "Llama-3.1-8B.json"))
    tr = trainable_of(read_config(CONFIGS / "Llama-3.1-8B.json"), "lora")
    base = Setup(method="lora", dtype_bytes=2)
    bf16 = estimate(shape, base, tr).weights
    nf4 = estimate(shape, replace(base, quant=4, double_quant=False), tr).weights
    dq = estimate(shape, replace(base, quant=4, double_quant=True), tr).weights
    rest = (shape.total_params - shape.linear_params - shape.norm_params) * 2 + shape.norm_params * 4
    assert (nf4 - rest) * 8 / shape.linear_params == pytest.approx(4.5, abs=0.01)     # 4 + 32/64
    assert (dq - rest) * 8 / shape.linear_params == pytest.approx(4.127, abs=0.01)    # QLoRA's figure
    assert bf16 > nf4 > dq


def test_8bit_adam_state_follows_bitsandbytes_rules():
    """Tensors under 4096 values keep fp32 moments; larger ones one byte per moment plus block absmax."""
    from leantune.plan.shape import Trainable

    tr = Trainable(count=100 + 2**16, shapes=[(100,), (256, 256)])
    s = Setup(optimizer="adamw_8bit")
    assert optimizer_bytes(s, tr, vocab=1000) == 2 * 100 * 4 + (2 * 2**16 + 2 * 4 * 256 + 2 * 256 * 4)
    assert optimizer_bytes(replace(s, optimizer="adamw"), tr, vocab=1000) == 8 * (100 + 2**16)


def test_checkpointing_and_8bit_lower_the_peak_and_grow_with_batch():
    cfg = read_config(CONFIGS / "Mistral-7B-v0.1.json")
    shape, tr = shape_of(cfg), trainable_of(cfg, "lora")
    s = Setup(method="lora", batch=2, seq=1024)
    peak = estimate(shape, s, tr).peak
    assert estimate(shape, replace(s, checkpointing=True), tr).peak < peak
    assert estimate(shape, replace(s, quant=4), tr).peak < peak
    assert estimate(shape, replace(s, batch=4), tr).peak > peak


def test_gpu_names_and_sizes():
    assert parse_gpu("rtx4090").name == "RTX 4090"
    assert parse_gpu("24GB").memory == 24 * 2**30
    assert parse_gpu("h100").name.startswith("H100")
    with pytest.raises(ConfigError, match="did you mean 'RTX 4090'"):
        parse_gpu("RTX 4909")


def test_config_without_needed_fields_is_one_line(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": 0}))
    with pytest.raises(ConfigError, match="lacks hidden_size"):
        shape_of(read_config(bad))


# ---------------------------------------------------------------------------------------------
# Against a measured run: the tiny Llama trained for 2 steps on CPU in its own process.

SEQ, BATCH = 64, 2
# Per component: weights, trainable, gradients and optimizer state are exact byte counts; the saved
# activations follow the layer terms of estimate.py (measured within 2% here); the peak is the process's
# RSS, most of it the runtime: the machine's process baseline the planner measures once (devices.process_baseline).
TOLERANCE = {"base_weights": 0.0, "trainable": 0.0, "gradients": 0.0, "optimizer_state": 0.0,
             "activations": 0.05, "peak": 0.10}


def _long_text_data(path: Path) -> Path:
    # every example is longer than SEQ tokens and truncated to it, so every row holds exactly SEQ tokens
    words = "the quick brown fox jumps over the lazy dog one two three four five six seven eight".split()
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(16):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(200))}) + "\n")
    return path


@pytest.mark.parametrize("method,extra", [("lora", []), ("full", []), ("lora", ["--train.gradient_checkpointing", "true"])])
def test_prediction_matches_a_measured_tiny_cpu_run(tiny_llama_dir, tmp_path, method, extra):
    data = _long_text_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "leantune.cli.main", "train", "--model", str(tiny_llama_dir), "--data.path", str(data),
           "--output_dir", str(out), "--train.progress", "false", "--train.tensorboard", "false",
           "--data.max_length", str(SEQ), "--train.batch_size", str(BATCH), "--train.max_steps", "2", "--dtype", "fp32",
           "--method", method, "--train.eval_every", "0", "--data.eval_fraction", "0", "--threads", "1", *extra]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    measured = json.loads((out / "summary.json").read_text())["memory"]

    # the plan as a user gets it: `leantune plan --json` in its own process (runtime: the measured baseline)
    planned = subprocess.run([sys.executable, "-m", "leantune.cli.main", "plan", str(tiny_llama_dir), "--seq", str(SEQ),
                              "--batch", str(BATCH), "--method", method, "--tflops", "0.05", "--json"],
                             capture_output=True, text=True, timeout=300)
    assert planned.returncode == 0, planned.stderr[-2000:]
    ckpt = bool(extra)
    e = next(r for r in json.loads(planned.stdout)["rows"] if r["setup"]["method"] == method
             and r["setup"]["quant"] is None and r["setup"]["optimizer"] == "adamw" and r["setup"]["checkpointing"] == ckpt)
    predicted = {"base_weights": e["weights"], "trainable": e["trainable"], "gradients": e["gradients"],
                 "optimizer_state": e["optimizer"], "activations": e["activations"], "peak": e["peak"]}
    for key, tol in TOLERANCE.items():
        got = measured[f"mem_{key}_bytes"]
        if key == "base_weights" and method == "full":
            assert got < 1024  # buffers only (rotary frequencies), which the planner leaves out
            continue
        assert predicted[key] == pytest.approx(got, rel=tol, abs=1024), key


def test_cpu_runtime_is_the_machine_baseline_measured_once_per_import_set(tmp_path, monkeypatch):
    """The CPU runtime is a fresh process's RSS after a run's imports (bitsandbytes only where the run uses
    it) and a tiny step, measured once and then read from $LEANTUNE_CACHE/plan/baseline.json."""
    from leantune.plan import devices
    from leantune.plan.estimate import runtime_bytes

    monkeypatch.setenv("LEANTUNE_CACHE", str(tmp_path))
    calls = []

    def fake(imports):
        calls.append(imports)
        return (500 if "bitsandbytes" in imports else 400) * 2**20

    monkeypatch.setattr(devices, "_rss_of_fresh_process", fake)
    assert runtime_bytes(Setup(device="cpu")) == 400 * 2**20
    assert runtime_bytes(Setup(device="cpu", quant=4)) == 500 * 2**20
    assert runtime_bytes(Setup(device="cpu", optimizer="adamw_8bit")) == 500 * 2**20
    assert runtime_bytes(Setup(device="cpu")) == 400 * 2**20   # cached: no third measurement
    assert runtime_bytes(Setup(device="cuda")) == 0
    assert len(calls) == 2 and "bitsandbytes" not in calls[0] and "torch" in calls[0]
    assert (tmp_path / "plan" / "baseline.json").exists()
