"""`leantune export` on the tiny Llama: an adapter folder is merged and written as GGUF with its fidelity
report and Modelfile; --adapter-only writes a GGUF LoRA; an unsupported architecture is a one-line error.
LoRA, DoRA and IA3 runs export through the one merge path (the file holds base + adapter); a QLoRA run
folds into the base `merge` uses, and says so; an existing file is replaced only with --overwrite; the
run's chat template and system prompt reach generate, the GGUF, the Modelfile and a merged folder."""

from __future__ import annotations

import json

import pytest
import torch

from leantune.cli.main import main

gguf = pytest.importorskip("gguf")


@pytest.fixture
def adapter_dir(tiny_llama, tiny_llama_dir, tmp_path):
    from leantune.adapters.lora import inject_lora
    from leantune.checkpoint.peft_format import save_adapter

    inject_lora(tiny_llama, rank=4, alpha=8, targets=["q_proj", "v_proj"])
    torch.manual_seed(0)
    for name, p in tiny_llama.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.2)
    return save_adapter(tiny_llama, tmp_path / "adapter", base_model_name_or_path=str(tiny_llama_dir))


def test_export_merges_the_adapter_and_writes_report_and_modelfile(adapter_dir, tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out" / "m.gguf"
    assert main(["export", str(adapter_dir), "--quant", "q8_0", "--out", str(out), "--modelfile", "--quiet"]) == 0
    report = json.loads((out.parent / "m.fidelity.json").read_text())
    assert report["quant"] == "Q8_0" and report["file_bytes"] == out.stat().st_size
    assert 8 < report["bits_per_weight"] < 9
    assert report["model"]["top1_agreement"] > 0.9 and abs(report["model"]["perplexity_delta_pct"]) < 5
    assert {t["name"] for t in report["tensors"]} >= {"token_embd.weight", "blk.1.attn_q.weight", "output.weight"}
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./m.gguf")
    assert "greedy top-1 agreement" in capsys.readouterr().out
    # the merge happened: the file's attn_v differs from the base model's by the adapter's delta
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    stored = {t.name: t for t in gguf.GGUFReader(out).tensors}["blk.0.attn_v.weight"]
    decoded = torch.from_numpy(gguf.quants.dequantize(stored.data, stored.tensor_type)).reshape(64 // 2, 64)
    assert (decoded - base.model.layers[0].self_attn.v_proj.weight).abs().max() > 0.01


def test_export_adapter_only_writes_a_gguf_lora(adapter_dir, tmp_path, capsys):
    out = tmp_path / "lora.gguf"
    assert main(["export", str(adapter_dir), "--adapter-only", "--out", str(out), "--quiet"]) == 0
    r = gguf.GGUFReader(out)
    assert r.fields["adapter.type"].contents() == "lora" and r.fields["adapter.lora.alpha"].contents() == 8.0
    assert {t.name for t in r.tensors} == {f"blk.{i}.attn_{m}.weight.lora_{ab}" for i in (0, 1) for m in "qv"
                                           for ab in "ab"}
    assert "8 LoRA tensors, alpha 8" in capsys.readouterr().out  # two layers x (q, v) x (a, b)


def test_unsupported_architecture_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    assert main(["export", str(tmp_path), "--quant", "Q4_K_M"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "GGUF export supports" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.glob("*.gguf"))


# ---------------------------------------------------------------------------------------------
# Runs of every mergeable method go through the one merge path (infer/materialize.py)

IDS = torch.tensor([[5, 17, 42, 99, 7, 230, 11, 64, 300, 2]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def _train(model_dir, tmp, name, *extra):
    from .test_train_cli import base_args, write_chat_data

    data = write_chat_data(tmp / f"{name}.jsonl", seed=len(name))
    out = tmp / name
    assert main(base_args(model_dir, data, out, "--train.max_steps", "3", "--train.lr", "2e-2", "--train.eval_every",
                          "0", "--dtype", "fp32", *extra)) == 0
    return out


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export-runs")
    return {"lora": _train(tiny_llama_dir, tmp, "lora"),
            "dora": _train(tiny_llama_dir, tmp, "dora", "--method", "dora"),
            "ia3": _train(tiny_llama_dir, tmp, "ia3", "--method", "ia3", "--train.lr", "0.3"),
            "qlora": _train(tiny_llama_dir, tmp, "qlora", "--quant.bits", "4")}


def _gguf_logits(path) -> torch.Tensor:
    from leantune.export.gguf.fidelity import load_gguf_back

    return _logits(load_gguf_back(path))


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_export_of_a_lora_dora_or_ia3_run_holds_base_plus_adapter(runs, tiny_llama_dir, tmp_path, method, capsys):
    from transformers import AutoModelForCausalLM

    from leantune.checkpoint.adapter_io import load_adapter

    out = tmp_path / f"{method}.gguf"
    assert main(["export", str(runs[method]), "--quant", "F32", "--out", str(out), "--quiet", "--no-eval"]) == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    load_adapter(model, runs[method] / "adapter")
    expected = _logits(model)
    assert not torch.allclose(expected, _logits(AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()))
    torch.testing.assert_close(_gguf_logits(out), expected, rtol=0, atol=1e-4)
    report = json.loads((tmp_path / f"{method}.fidelity.json").read_text())
    assert report["merge"]["method"] == method and report["merge"]["base"] == "16-bit"


def test_export_of_a_qlora_run_folds_into_the_base_merge_uses_and_says_so(runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert main(["merge", str(runs["qlora"]), "--out", str(tmp_path / "merged"), "--no-report"]) == 0
    merged = _logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval())
    capsys.readouterr()
    out = tmp_path / "q.gguf"
    assert main(["export", str(runs["qlora"]), "--quant", "F32", "--out", str(out), "--quiet", "--no-eval"]) == 0
    assert "dequantized 4-bit base it was trained against" in capsys.readouterr().err
    torch.testing.assert_close(_gguf_logits(out), merged, rtol=0, atol=1e-4)   # export and merge agree
    assert json.loads((tmp_path / "q.fidelity.json").read_text())["merge"]["base"] == "dequantized"
    orig = tmp_path / "orig.gguf"
    assert main(["export", str(runs["qlora"]), "--quant", "F32", "--out", str(orig), "--quiet", "--no-eval",
                 "--merge-base", "original"]) == 0
    assert not torch.allclose(_gguf_logits(orig), merged, atol=1e-4)


def test_export_refuses_to_replace_an_existing_file_unless_overwrite(adapter_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_text("the user's own file")
    assert main(["export", str(adapter_dir), "--quant", "F16", "--out", str(out), "--quiet", "--no-eval"]) == 2
    err = capsys.readouterr().err.strip()
    assert "already exists; pass --overwrite" in err and len(err.splitlines()) == 1
    assert out.read_text() == "the user's own file"
    assert main(["export", str(adapter_dir), "--quant", "F16", "--out", str(out), "--quiet", "--no-eval",
                 "--overwrite"]) == 0
    assert gguf.GGUFReader(out).tensors


def test_a_quant_the_format_does_not_have_is_a_one_line_error(adapter_dir, tmp_path, capsys):
    assert main(["export", str(adapter_dir), "--quant", "IQ2_XS", "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not a gguf quant type; choose one of" in err and "Q4_K_M" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "x.gguf").exists()


# ---------------------------------------------------------------------------------------------
# The run's chat template and system prompt reach every artifact and generate


@pytest.fixture(scope="module")
def chatml_run(tmp_path_factory):
    """A run trained with --data.chat_template chatml and a system prompt, on a base whose tokenizer has none."""
    from tests.conftest import save_tiny_llama

    tmp = tmp_path_factory.mktemp("no-template")
    base = tmp / "base"
    save_tiny_llama(base, chat_template=None)
    return base, _train(base, tmp, "chatml", "--data.chat_template", "chatml", "--data.system_prompt", "Answer briefly.")


def test_the_runs_chat_template_goes_into_generate_the_gguf_the_modelfile_and_the_merged_folder(chatml_run, tmp_path):
    from transformers import AutoTokenizer

    from leantune.data.tokenize import NAMED_TEMPLATES
    from leantune.infer.generate import build_prompt, load_for_inference, run_system_prompt

    base, run = chatml_run
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    chatml = NAMED_TEMPLATES["chatml"]
    _, tok = load_for_inference(str(run), dtype="fp32", device="cpu")
    assert tok.chat_template == chatml and run_system_prompt(str(run)) == "Answer briefly."
    ids = build_prompt(tok, [{"role": "user", "content": "hi"}], raw=False)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")   # not the plain text
    out = tmp_path / "m.gguf"
    assert main(["export", str(run), "--quant", "F16", "--out", str(out), "--quiet", "--no-eval", "--modelfile"]) == 0
    assert gguf.GGUFReader(out).fields["tokenizer.chat_template"].contents() == chatml
    modelfile = (tmp_path / "Modelfile").read_text()
    assert 'TEMPLATE """' in modelfile and "<|im_start|>{{ .Role }}" in modelfile
    assert 'SYSTEM """Answer briefly."""' in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert main(["merge", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == chatml
