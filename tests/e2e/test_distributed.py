"""Two processes under torchrun (CPU, gloo) train as one process with twice the micro-batch.

Each torchrun start costs ~10 s here (two interpreters importing torch and transformers), so the runs are
shared: one single-process reference (micro-batch 2) and one run per strategy (2 x micro-batch 1), all fp32
LoRA or full fine-tuning of the tiny Llama for 4 steps with a checkpoint at step 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from leantune.cli.main import main

from .test_train_cli import read_metrics, write_chat_data

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
STEPS = 4


def args(model_dir, data, out, *extra, batch: int) -> list[str]:
    return ["train", "--model", str(model_dir), "--data.path", str(data), "--output_dir", str(out),
            "--train.progress", "false", "--train.tensorboard", "false", "--lora.rank", "4", "--lora.alpha", "8",
            "--data.max_length", "64", "--dtype", "fp32", "--threads", "1", "--train.max_steps", str(STEPS),
            "--train.lr", "1e-2", "--train.eval_every", "2", "--train.save_every", "2",
            "--train.batch_size", str(batch), *extra]


NATIVE_ABORT = "terminate called without an active exception"


def torchrun(argv: list[str], env: dict | None = None, timeout: float = 150) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(WORKER), *argv]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if r.returncode != 0 and NATIVE_ABORT in r.stderr and "--resume" not in argv:
        # Seen once in three clean-clone runs (2026-11-26, 2 cores shared with the other xdist worker): a rank
        # aborted in C++ (SIGABRT, no Python error) inside torch's gloo threads. The job is run once more from
        # scratch, and then has to pass every assertion its caller makes; a second abort fails the test.
        warnings.warn(f"a torchrun rank aborted natively ({NATIVE_ABORT}); running the job once more")
        shutil.rmtree(argv[argv.index("--output_dir") + 1], ignore_errors=True)
        r = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    return r


def losses(run_dir: Path, key: str = "loss") -> list[float]:
    return [m[key] for m in read_metrics(run_dir) if key in m]


def assert_same_tensors(a: dict, b: dict, atol: float = 2e-5) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    """The reference (1 process x 2 rows) and the LoRA runs under DDP and FSDP2 (2 processes x 1 row)."""
    tmp = tmp_path_factory.mktemp("dist")
    data = write_chat_data(tmp / "d.jsonl", n=24)
    out = {"data": data, "tmp": tmp}
    assert main(args(tiny_llama_dir, data, tmp / "one", batch=2)) == 0
    out["one"] = tmp / "one"
    for strategy in ("ddp", "fsdp2"):
        r = torchrun(args(tiny_llama_dir, data, tmp / strategy, "--distributed.strategy", strategy, batch=1))
        assert r.returncode == 0, r.stderr[-3000:]
        out[strategy] = tmp / strategy
        out[strategy + "_stdout"] = r.stdout
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_train_as_one_with_twice_the_micro_batch(runs, strategy):
    one, two = runs["one"], runs[strategy]
    assert len(losses(two)) == STEPS
    torch.testing.assert_close(torch.tensor(losses(two)), torch.tensor(losses(one)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(losses(two, "grad_norm")), torch.tensor(losses(one, "grad_norm")),
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.tensor(losses(two, "eval_loss")), torch.tensor(losses(one, "eval_loss")),
                               atol=1e-5, rtol=1e-5)
    assert [m["label_tokens"] for m in read_metrics(two) if "loss" in m] == \
           [m["label_tokens"] for m in read_metrics(one) if "loss" in m]  # every example once, across ranks
    assert_same_tensors(load_file(two / "adapter" / "adapter_model.safetensors"),
                        load_file(one / "adapter" / "adapter_model.safetensors"))
    ckpt = "checkpoints/step-000002"  # the checkpoint holds full tensors, as a one-process run's
    assert_same_tensors(load_file(two / ckpt / "trainable.safetensors"), load_file(one / ckpt / "trainable.safetensors"))
    # rank 0 alone prints: one "done" line, one eval line per evaluation
    assert runs[strategy + "_stdout"].count("done:") == 1
    assert runs[strategy + "_stdout"].count(": eval loss") == 2
    assert f"{strategy} over 2 processes" in runs[strategy + "_stdout"]


def test_the_fsdp2_adapter_loads_in_peft_with_the_one_process_logits(runs, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[1, 7, 9, 11, 13, 17, 19, 23]])
    logits = []
    for run in (runs["one"], runs["fsdp2"]):
        base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(run / "adapter")).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(ids).logits - logits[0]).abs().max() > 1e-3  # the adapter is not empty
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=1e-5)


def test_full_fine_tuning_under_fsdp2_with_activation_checkpointing(runs, tiny_llama_dir):
    """Full fine-tuning sharded per decoder layer, activations recomputed: the same steps and the same
    saved model as one process, and the folder loads in transformers."""
    from transformers import AutoModelForCausalLM

    tmp, data = runs["tmp"], runs["data"]
    full = ("--method", "full", "--train.lr", "1e-3")
    assert main(args(tiny_llama_dir, data, tmp / "full-one", *full, batch=2)) == 0
    r = torchrun(args(tiny_llama_dir, data, tmp / "full-two", *full, "--distributed.strategy", "fsdp2",
                      "--train.gradient_checkpointing", "true", batch=1))
    assert r.returncode == 0, r.stderr[-3000:]
    torch.testing.assert_close(torch.tensor(losses(tmp / "full-two")), torch.tensor(losses(tmp / "full-one")),
                               atol=1e-5, rtol=1e-5)
    assert_same_tensors(load_file(tmp / "full-two/model/model.safetensors"),
                        load_file(tmp / "full-one/model/model.safetensors"))
    AutoModelForCausalLM.from_pretrained(tmp / "full-two/model")


def test_a_rank_that_raises_ends_the_job_fast_with_its_error(runs, tiny_llama_dir):
    r = torchrun(args(tiny_llama_dir, runs["data"], runs["tmp"] / "raise", batch=1),
                 env={"LEANTUNE_TEST_FAULT": "raise:1:3"}, timeout=300)
    ended = time.time()
    assert r.returncode != 0
    assert "injected failure on rank 1 at step 3" in r.stdout + r.stderr
    raised = float(re.search(r"injected failure on rank 1 at step 3 \(t=([0-9.]+)\)", r.stdout + r.stderr).group(1))
    assert ended - raised < 30  # seconds from the error to the job's end, far from the 600 s collective timeout
    assert not (runs["tmp"] / "raise" / "summary.json").exists()


@pytest.mark.slow
def test_resume_after_kill_9_of_one_rank_and_with_another_world_size(runs, tiny_llama_dir):
    """Rank 1 is killed (SIGKILL) in step 3, after the step-2 checkpoint: torchrun ends the job; resuming
    with 2 processes, or with 1 process of twice the micro-batch, gives the uninterrupted curve and adapter."""
    tmp, data = runs["tmp"], runs["data"]
    r = torchrun(args(tiny_llama_dir, data, tmp / "killed", batch=1), env={"LEANTUNE_TEST_FAULT": "kill:1:3"})
    assert r.returncode != 0
    assert [c.name for c in (tmp / "killed/checkpoints").iterdir()] == ["step-000002"]
    shutil.copytree(tmp / "killed", tmp / "killed-1")
    r = torchrun(args(tiny_llama_dir, data, tmp / "killed", "--resume", batch=1))
    assert r.returncode == 0, r.stderr[-3000:]
    assert main(args(tiny_llama_dir, data, tmp / "killed-1", "--resume", batch=2)) == 0  # world size 2 -> 1
    for resumed in (tmp / "killed", tmp / "killed-1"):
        torch.testing.assert_close(torch.tensor(losses(resumed)), torch.tensor(losses(runs["ddp"])),
                                   atol=1e-5, rtol=1e-5)
        assert_same_tensors(load_file(resumed / "adapter/adapter_model.safetensors"),
                            load_file(runs["ddp"] / "adapter/adapter_model.safetensors"))
    # a changed global batch would shift the data position: refused, naming the fix
    shutil.copytree(tmp / "killed-1", tmp / "killed-2", ignore=shutil.ignore_patterns("summary.json", "adapter"))
    assert main(args(tiny_llama_dir, data, tmp / "killed-2", "--resume", batch=1)) == 2


def test_qlora_under_fsdp2_repeated_eval_forwards_agree(runs, tiny_llama_dir):
    """bitsandbytes repacks a 4-bit weight in place on its first eval-mode no-grad forward on CPU; were
    FSDP2 to shard it, the next all-gather would bring back unrepacked bytes and every later forward would
    be silently wrong (research: 6.40746, then 6.45698). The 4-bit base stays out of FSDP2: three
    evaluations agree, and equal one process's. bitsandbytes repacks only where the CPU has AVX512-BF16
    (`Linear4bit.support_avx512bf16_for_cpu`); without it (this project's CI machine) the test still checks
    that QLoRA runs under FSDP2 and scores as one process, and it guards the fix wherever the repack happens."""
    tmp, data = runs["tmp"], runs["data"]
    argv = args(tiny_llama_dir, data, tmp / "qlora-two", "--quant.bits", "4", "--distributed.strategy", "fsdp2", batch=1)
    r = torchrun(argv, env={"LEANTUNE_TEST_PROBE": str(tmp / "probe-two.json")})
    assert r.returncode == 0, r.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LEANTUNE_TEST_PROBE": str(tmp / "probe-one.json")}
    argv_one = args(tiny_llama_dir, data, tmp / "qlora-one", "--quant.bits", "4", batch=2)
    one = subprocess.run([sys.executable, str(WORKER), *argv_one], env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-3000:]
    two = json.loads((tmp / "probe-two.json").read_text())
    ref = json.loads((tmp / "probe-one.json").read_text())
    assert two["world_size"] == 2 and ref["world_size"] == 1
    assert two["losses"][0] == two["losses"][1] == two["losses"][2]
    assert abs(two["losses"][0] - ref["losses"][0]) < 1e-5
