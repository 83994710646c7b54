"""The CLI end to end on a tiny random Llama: training lowers the loss, the run folder is complete,
a killed run resumes to the same adapter, and gradient accumulation equals a bigger batch."""

from __future__ import annotations

import json
import random

import torch
from safetensors.torch import load_file

from leantune.cli.main import main

WORDS = "the quick brown fox jumps over lazy dog one two three four five six seven eight".split()


def write_chat_data(path, n=48, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
            # a learnable style: every answer is the same phrase, then the question's first word
            a = "the quick brown fox says " + q.split()[0]
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return path


def base_args(model_dir, data, out, *extra):
    return ["train", "--model", str(model_dir), "--data.path", str(data), "--output_dir", str(out),
            "--train.progress", "false", "--train.tensorboard", "false", "--lora.rank", "4", "--lora.alpha", "8",
            "--data.max_length", "64", *extra]


def read_metrics(run_dir):
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_cli_trains_tiny_llama_and_loss_falls(tiny_llama_dir, tmp_path):
    data = write_chat_data(tmp_path / "d.jsonl")
    out = tmp_path / "run"
    rc = main(base_args(tiny_llama_dir, data, out, "--train.max_steps", "30", "--train.lr", "1e-2",
                        "--train.eval_every", "10", "--dtype", "fp32"))
    assert rc == 0
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.85 * sum(losses[:5]) / 5
    assert any("eval_loss" in m for m in read_metrics(out))
    assert (out / "loss.svg").read_text().startswith("<svg")
    for name in ("config.yaml", "summary.json", "data_report.json", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors"):
        assert (out / name).exists(), name
    assert json.loads((out / "summary.json").read_text())["steps"] == 30


def test_refuses_to_overwrite_a_finished_run(tiny_llama_dir, tmp_path, capsys):
    data = write_chat_data(tmp_path / "d.jsonl", n=8)
    out = tmp_path / "run"
    assert main(base_args(tiny_llama_dir, data, out, "--train.max_steps", "1")) == 0
    assert main(base_args(tiny_llama_dir, data, out, "--train.max_steps", "1")) == 2
    err = capsys.readouterr().err  # a finished run cannot be resumed, so --resume is not the fix offered
    assert "finished run" in err and "--output_dir" in err and "--resume" not in err


def test_killed_run_resumes_to_the_same_adapter(tiny_llama_dir, tmp_path):
    from leantune.config import from_dict
    from leantune.train.loop import run

    data = write_chat_data(tmp_path / "d.jsonl")

    def cfg(out):
        return from_dict({"model": str(tiny_llama_dir), "output_dir": str(out), "dtype": "fp32",
                          "data": {"path": str(data), "max_length": 64},
                          "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
                          "train": {"max_steps": 8, "batch_size": 2, "grad_accum": 2, "save_every": 3,
                                    "lr": 3e-3, "progress": False, "tensorboard": False, "epochs": 1}})

    full = run(cfg(tmp_path / "full"), console=lambda s: None)
    crashed = run(cfg(tmp_path / "crash"), console=lambda s: None, stop_after=5)  # dies after step 5
    assert crashed.stopped == "interrupted" and crashed.adapter_dir is None
    assert not (tmp_path / "crash" / "adapter").exists() and not (tmp_path / "crash" / "summary.json").exists()
    resumed = run(cfg(tmp_path / "crash"), resume=True, console=lambda s: None)  # from step 3
    assert resumed.steps == 8
    a = load_file(str(full.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    steps = [m["step"] for m in read_metrics(tmp_path / "crash") if "loss" in m]
    assert steps == list(range(1, 9))  # the lost tail (steps 4-5) was dropped from the log


def test_gradient_accumulation_equals_one_big_batch(tiny_llama, tiny_tokenizer):
    """1 micro-batch of 4 and 4 micro-batches of 1 give the same gradient: the loss of every
    micro-batch is divided by the label tokens of the whole step, not its own."""
    from leantune.adapters.base import mark_only_adapters_trainable
    from leantune.adapters.lora import inject_lora
    from leantune.train.step import micro_batch_loss

    torch.manual_seed(0)
    inject_lora(tiny_llama, rank=4, alpha=8, targets="all-linear")
    mark_only_adapters_trainable(tiny_llama)
    for name, p in tiny_llama.named_parameters():
        if p.requires_grad and "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    lengths = [5, 9, 13, 7]
    seqs = [torch.randint(6, 400, (n,)) for n in lengths]
    labels = [s.clone() for s in seqs]
    for lab, n in zip(labels, lengths):
        lab[: n // 2] = -100  # a prompt part, not trained

    def batch(idx):
        T = max(lengths[i] for i in idx)
        ids = torch.full((len(idx), T), 3)
        lab = torch.full((len(idx), T), -100)
        mask = torch.zeros((len(idx), T), dtype=torch.long)
        for r, i in enumerate(idx):
            ids[r, : lengths[i]] = seqs[i]
            lab[r, : lengths[i]] = labels[i]
            mask[r, : lengths[i]] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": mask,
                "num_label_tokens": int((lab[:, 1:] != -100).sum())}

    params = [p for p in tiny_llama.parameters() if p.requires_grad]
    big = batch([0, 1, 2, 3])
    micro_batch_loss(tiny_llama, big, normalizer=big["num_label_tokens"], chunk=16)[0].backward()
    g_big = [p.grad.clone() for p in params]
    tiny_llama.zero_grad()
    micro = [batch([i]) for i in range(4)]
    total = sum(b["num_label_tokens"] for b in micro)
    assert total == big["num_label_tokens"]
    for b in micro:
        micro_batch_loss(tiny_llama, b, normalizer=total, chunk=16)[0].backward()
    for g1, p in zip(g_big, params):
        torch.testing.assert_close(p.grad, g1, rtol=1e-4, atol=1e-6)


def test_trained_adapter_loads_in_peft_with_identical_logits_and_generates(tiny_llama_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from leantune.infer.generate import load_for_inference

    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    out = tmp_path / "run"
    assert main(base_args(tiny_llama_dir, data, out, "--train.max_steps", "3", "--train.lr", "1e-2",
                          "--dtype", "fp32", "--lora.rslora", "true")) == 0
    ids = torch.randint(6, 400, (2, 12))
    ours, _ = load_for_inference(str(out), dtype="fp32", device="cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    theirs = PeftModel.from_pretrained(base, str(out / "adapter")).eval()
    with torch.no_grad():
        a, b = ours(ids).logits, theirs(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a - plain).abs().max() > 1e-4  # the adapter is really applied

    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "the quick", "--max-new-tokens", "5", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out.strip()


def test_inspect_data_reads_paths_relative_to_the_config(tiny_llama_dir, tmp_path, capsys):
    sub = tmp_path / "proj"
    sub.mkdir()
    write_chat_data(sub / "train.jsonl", n=4)
    (sub / "c.yaml").write_text(f"model: {tiny_llama_dir}\ndata: {{path: train.jsonl}}\n")
    assert main(["inspect-data", str(sub / "c.yaml"), "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "[[" in out and "trained" in out
