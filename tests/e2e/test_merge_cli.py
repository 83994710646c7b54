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


def _recipe(tmp_path, **fields):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(fields))
    return str(path)


def test_recipe_cat_adapter_of_different_ranks_is_the_exact_weighted_sum(runs, tiny_llama_dir, tmp_path):
    from leantune.adapters.base import adapter_modules
    from leantune.merge.combine import read_adapter

    a, b = runs["plain"] / "adapter", runs["other"] / "adapter"   # rank 4 on all-linear, rank 6 on q/v
    recipe = _recipe(tmp_path, adapters=[str(a), str(b)], weights=[1.0, -0.5], method="cat", output="adapter",
                     out=str(tmp_path / "cat"))
    assert main(["merge", recipe]) == 0
    merged = read_adapter(tmp_path / "cat")
    assert merged.rank == 10 and merged.scaling == 1.0
    la, lb = read_adapter(a), read_adapter(b)
    for path in merged.factors:
        expected = la.delta(path) - 0.5 * (lb.delta(path) if path in lb.factors else 0)
        torch.testing.assert_close(merged.delta(path), expected, rtol=1e-5, atol=1e-6)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    load_adapter(model, tmp_path / "cat")   # our own loader (and PEFT's format) read it back
    assert len(adapter_modules(model)) == len(la.factors)


def test_recipe_model_output_equals_base_plus_combined_adapter(runs, tiny_llama_dir, tmp_path):
    adapters = [str(runs["plain"] / "adapter"), str(runs["other"] / "adapter")]
    common = dict(adapters=adapters, weights=[0.5, 0.5], method="ties", density=0.5, rank=4)
    assert main(["merge", _recipe(tmp_path, **common, output="adapter"), "--out", str(tmp_path / "ad")]) == 0
    assert main(["merge", _recipe(tmp_path, **common, output="model"), "--out", str(tmp_path / "model")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged), _adapter_logits(tiny_llama_dir, tmp_path / "ad"), rtol=0, atol=1e-5)


BAD_RECIPES = [
    (dict(method="avg"), "unknown merge method 'avg'"),
    (dict(method="tie", density=0.5), "did you mean ties?"),
    (dict(weights=[1.0]), "1 weights for 2 adapters"),
    (dict(method="ties"), "needs a density in (0, 1]"),
    (dict(method="svd", rank=0), "rank must be a positive integer"),
    (dict(output="gguf"), "output must be adapter or model"),
    (dict(wieghts=[1, 1]), "did you mean weights?"),
]


@pytest.mark.parametrize("change,message", BAD_RECIPES, ids=[m for _, m in BAD_RECIPES])
def test_bad_recipes_are_one_line_errors_and_write_nothing(runs, tmp_path, capsys, change, message):
    fields = {"adapters": [str(runs["plain"] / "adapter"), str(runs["other"] / "adapter")], "weights": [1.0, 1.0],
              "method": "cat", "out": str(tmp_path / "out"), **change}
    assert main(["merge", _recipe(tmp_path, **fields)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def _altered_adapter(src, dst, edit):
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    config = json.loads((src / "adapter_config.json").read_text())
    tensors = load_file(src / "adapter_model.safetensors")
    config, tensors = edit(config, tensors)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    save_file(tensors, dst / "adapter_model.safetensors")
    return dst


def _other_base(config, tensors):
    return {**config, "base_model_name_or_path": "someone/else-7b"}, tensors


def _other_shape(config, tensors):
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    return config, {**tensors, key: torch.zeros(tensors[key].shape[0], 32)}


def _missing_partner(config, tensors):
    key = next(k for k in tensors if k.endswith("lora_B.weight"))
    return config, {k: v for k, v in tensors.items() if k != key}


@pytest.mark.parametrize("edit,message", [(_other_base, "merge only adapters of one base"),
                                          (_other_shape, "trained for different bases"),
                                          (_missing_partner, "but not its partner")])
def test_mismatched_adapters_are_one_line_errors_and_write_nothing(runs, tmp_path, capsys, edit, message):
    a = runs["plain"] / "adapter"
    bad = _altered_adapter(a, tmp_path / "bad", edit)
    recipe = _recipe(tmp_path, adapters=[str(a), str(bad)], weights=[1, 1], method="svd", out=str(tmp_path / "out"))
    assert main(["merge", recipe]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()
