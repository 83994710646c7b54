"""`leantune export` on the tiny Llama: an adapter folder is merged and written as GGUF with its fidelity
report and Modelfile; --adapter-only writes a GGUF LoRA; an unsupported architecture is a one-line error."""

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
