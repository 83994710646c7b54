"""`leantune merge` end to end on the tiny Llama.

A run's adapter (LoRA, DoRA or IA3) folded into its base is a folder plain transformers loads, whose
logits equal base + adapter (fp32, 1e-5), with the run's chat template, and merge_report.json says what
was merged into which base. From a QLoRA run, `--merge-base dequantized` matches the adapter-on-4-bit model
(KL ~ 0) and `--merge-base original` does not, scored on a few held-out records without tokenizing the rest.
An output folder holding the user's files is never replaced; `--out .` and an unwritable --out are
one-line errors. Recipes combine adapters into a PEFT adapter or a model; bad recipes are one-line
errors, nothing written.
"""

from __future__ import annotations

import json
import os

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
            "qlora": _train(tiny_llama_dir, tmp, "qlora", "--quant.bits", "4"),
            "dora": _train(tiny_llama_dir, tmp, "dora", "--method", "dora"),
            "ia3": _train(tiny_llama_dir, tmp, "ia3", "--method", "ia3", "--train.lr", "0.3"),
            "bottleneck": _train(tiny_llama_dir, tmp, "bottleneck", "--method", "bottleneck")}


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
    report = json.loads((out / "merge_report.json").read_text())
    assert report["merge"]["method"] == "lora" and report["merge"]["base"] == "16-bit" and "kl_mean" not in report
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary left over


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_dora_and_ia3_runs_merge_into_a_folder_with_base_plus_adapter_logits(runs, tiny_llama_dir, tmp_path, method):
    from leantune.checkpoint.adapter_io import load_adapter as load_any

    out = tmp_path / method
    assert main(["merge", str(runs[method]), "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    load_any(model, runs[method] / "adapter")
    expected = _logits(model)
    assert not torch.allclose(expected, _logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()))
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(merged), expected, rtol=0, atol=1e-5)
    assert json.loads((out / "merge_report.json").read_text())["merge"]["method"] == method


def test_qlora_merge_reports_its_cost_and_dequantized_is_the_faithful_base(runs, tmp_path, capsys):
    reports, logits = {}, {}
    for base, flag in (("dequantized", "--merge-base"), ("original", "--base")):  # --base: the earlier name
        out = tmp_path / base
        assert main(["merge", str(runs["qlora"]), "--out", str(out), flag, base, "--eval-batches", "2"]) == 0
        reports[base] = json.loads((out / "merge_report.json").read_text())
        err = capsys.readouterr().err
        assert "merge cost" in err and ("dequantized 4-bit base" in err) == (base == "dequantized")
        assert reports[base]["merge"]["base"] == base
        logits[base] = _logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval())
    assert not torch.allclose(logits["dequantized"], logits["original"], atol=1e-4)   # the choice is real
    deq, orig = reports["dequantized"], reports["original"]
    assert deq["quant_bits"] == 4 and deq["tokens"] > 0 and deq["data"] == "eval split"
    # 2 batches need at most the 10 held-out records: the 38 training records are never tokenized
    assert 0 < deq["records_tokenized"] <= 10
    assert deq["kl_mean"] < 1e-6 and abs(deq["loss_change"]) < 1e-4      # the model the adapter was trained as
    assert orig["kl_mean"] > 100 * max(deq["kl_mean"], 1e-9)              # the 16-bit weights it never saw


def test_merge_of_a_plain_model_or_missing_out_is_a_one_line_error(tiny_llama_dir, runs, tmp_path, capsys):
    assert main(["merge", str(tiny_llama_dir), "--out", str(tmp_path / "x")]) == 2
    assert main(["merge", str(runs["plain"])]) == 2
    err = capsys.readouterr().err
    assert "neither a run folder nor an adapter folder" in err and "--out DIR" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_an_unmergeable_method_is_a_one_line_error_and_writes_nothing(runs, tmp_path, capsys):
    out = tmp_path / "b"
    assert main(["merge", str(runs["bottleneck"]), "--out", str(out)]) == 2
    assert main(["export", str(runs["bottleneck"]), "--out", str(tmp_path / "b.gguf"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("bottleneck adapter, which cannot be folded" in e for e in err)
    assert not out.exists() and not (tmp_path / "b.gguf").exists()


def test_an_output_folder_with_the_users_files_is_never_replaced(runs, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    for extra in ([], ["--overwrite"]):
        assert main(["merge", str(runs["plain"]), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert (out / "notes.txt").read_text() == "my notes" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    # an earlier leantune output is replaced only with --overwrite, and not once the user added a file to it
    again = tmp_path / "merged"
    assert main(["merge", str(runs["plain"]), "--out", str(again)]) == 0
    assert main(["merge", str(runs["plain"]), "--out", str(again)]) == 2
    assert "already exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert main(["merge", str(runs["plain"]), "--out", str(again), "--overwrite"]) == 0
    (again / "README.md").write_text("my model card")
    assert main(["merge", str(runs["plain"]), "--out", str(again), "--overwrite"]) == 2
    assert "did not write (README.md)" in capsys.readouterr().err and (again / "README.md").exists()


def test_merge_into_the_current_folder_or_an_unwritable_one_is_a_one_line_error(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["merge", str(runs["plain"]), "--out", "."]) == 2
    assert "is the folder you are in" in capsys.readouterr().err
    assert main(["merge", str(runs["plain"]), "--out", str(runs["plain"])]) == 2   # the run itself
    assert "holds the source" in capsys.readouterr().err and (runs["plain"] / "adapter").is_dir()
    locked = "/proc/leantune-merge" if os.path.isdir("/proc/self") else None
    if locked is None or os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        locked = str(ro / "merged")
    assert main(["merge", str(runs["plain"]), "--out", locked]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not writable" in err and len(err.splitlines()) == 1 and "Traceback" not in err


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
