"""`leantune merge` end to end on the tiny Llama.

A run's adapter folded into its base is a folder plain transformers loads, whose logits equal base +
adapter (fp32, 1e-5), with the tokenizer's chat template. From a QLoRA run, `--base dequantized` matches
the adapter-on-4-bit model (KL ~ 0) and `--base original` does not, and merge_report.json says so.
Recipes combine adapters into a PEFT adapter or a model; bad recipes are one-line errors, nothing written.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from leantune.checkpoint.peft_format import load_adapter
from leantune.cli.main import main

from .test_train_cli import base_args, write_chat_data

IDS = torch.tensor([[5, 17, 42, 99, 7, 230, 11, 64, 300, 2]])


def _train(model_dir, tmp, name, *extra):
    data = write_chat_data(tmp / f"{name}.jsonl", seed=len(name))
    out = tmp / name
    assert main(base_args(model_dir, data, out, "--train.max_steps", "3", "--train.lr", "2e-2", "--train.eval_every",
                          "0", "--dtype", "fp32", "--data.eval_fraction", "0.2", *extra)) == 0
    return out


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("merge-runs")
    return {"plain": _train(tiny_llama_dir, tmp, "plain"),
            "other": _train(tiny_llama_dir, tmp, "other", "--lora.rank", "6", "--lora.targets", "[q_proj, v_proj]"),
            "qlora": _train(tiny_llama_dir, tmp, "qlora", "--quant.bits", "4")}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _adapter_logits(base_dir, adapter_dir) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    load_adapter(model, adapter_dir)
    return _logits(model)


def test_merged_model_loads_in_transformers_with_base_plus_adapter_logits(runs, tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "merged"
    assert main(["merge", str(runs["plain"]), "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    expected = _adapter_logits(tiny_llama_dir, runs["plain"] / "adapter")
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected, _logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()))
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(tiny_llama_dir).chat_template
    assert not (out / "merge_report.json").exists()  # nothing to report for a 16-bit base
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left over


def test_qlora_merge_reports_its_cost_and_dequantized_is_the_faithful_base(runs, tmp_path, capsys):
    reports = {}
    for base in ("dequantized", "original"):
        out = tmp_path / base
        assert main(["merge", str(runs["qlora"]), "--out", str(out), "--base", base, "--eval-batches", "2"]) == 0
        reports[base] = json.loads((out / "merge_report.json").read_text())
        assert "merge cost" in capsys.readouterr().err
        assert AutoModelForCausalLM.from_pretrained(out) is not None
    deq, orig = reports["dequantized"], reports["original"]
    assert deq["quant_bits"] == 4 and deq["tokens"] > 0 and deq["data"] == "eval split"
    assert deq["kl_mean"] < 1e-6 and abs(deq["loss_change"]) < 1e-4      # the model the adapter was trained as
    assert orig["kl_mean"] > 100 * max(deq["kl_mean"], 1e-9)              # the 16-bit weights it never saw


def test_merge_of_a_plain_model_or_missing_out_is_a_one_line_error(tiny_llama_dir, runs, tmp_path, capsys):
    assert main(["merge", str(tiny_llama_dir), "--out", str(tmp_path / "x")]) == 2
    assert main(["merge", str(runs["plain"])]) == 2
    err = capsys.readouterr().err
    assert "neither a run folder nor an adapter folder" in err and "--out DIR" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
