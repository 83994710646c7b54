"""The exporter registry: a format is one class in one file. A toy exporter defined here, and nowhere
else, is a `--format` choice of the CLI and receives the merged model from the one merge path; the
--help table of built-in quant types matches the registered classes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from leantune.cli.main import build_parser, main
from leantune.export.base import BUILTIN_QUANTS, EXPORTERS, Exporter, available, get


class ToyExporter(Exporter, format="toy"):
    """Every tensor of the merged model in one safetensors file, in fp16 or fp32."""

    quants = ("FP16", "FP32")
    default_quant = "FP32"
    suffix = ".toy"

    def write(self, model, tokenizer, facts, folder, out, quant, options):
        dtype = torch.float16 if quant == "FP16" else torch.float32
        save_file({k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}, str(out))
        report = {"file": str(out), "quant": quant, "merge": facts.as_dict()}
        out.with_suffix(".json").write_text(json.dumps(report))
        return report


@pytest.fixture
def adapter_dir(tiny_llama, tiny_llama_dir, tmp_path):
    from leantune.adapters.ia3 import inject_ia3
    from leantune.checkpoint.adapter_io import save_adapter

    inject_ia3(tiny_llama, targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"])
    with torch.no_grad():
        for name, p in tiny_llama.named_parameters():
            if name.endswith(".scale"):
                p.uniform_(0.5, 1.5)
    return save_adapter(tiny_llama, tmp_path / "adapter", base_model_name_or_path=str(tiny_llama_dir))


def test_a_toy_exporter_in_one_file_is_a_cli_format_and_gets_the_merged_model(adapter_dir, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from leantune.checkpoint.adapter_io import load_adapter

    assert "toy" in available()
    fmt = next(a for a in build_parser()._subparsers._group_actions[0].choices["export"]._actions
               if "--format" in a.option_strings)
    assert "toy" in fmt.help
    out = tmp_path / "m.toy"
    assert main(["export", str(adapter_dir), "--format", "toy", "--quant", "fp16", "--out", str(out)]) == 0
    written = load_file(out)
    assert all(t.dtype == torch.float16 for t in written.values())
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).state_dict()
    assert set(written) == set(base)                       # merged: the base's own keys, no adapter left
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    load_adapter(model, adapter_dir)
    v = model.model.layers[0].self_attn.v_proj                  # IA3 on v: y = l * (W x), so W' = l[:, None] * W
    expected = v.scale.detach().reshape(-1, 1) * v.base_layer.weight
    torch.testing.assert_close(written["model.layers.0.self_attn.v_proj.weight"].float(), expected, rtol=1e-3, atol=1e-3)
    assert not torch.allclose(expected, base["model.layers.0.self_attn.v_proj.weight"], atol=1e-3)
    assert json.loads(out.with_suffix(".json").read_text())["merge"]["method"] == "ia3"


def test_a_quant_the_toy_format_lacks_is_refused_and_the_default_is_its_own(adapter_dir, tmp_path, capsys):
    assert main(["export", str(adapter_dir), "--format", "toy", "--quant", "Q4_K_M", "--out", str(tmp_path / "a.toy")]) == 2
    assert "not a toy quant type; choose one of FP16, FP32" in capsys.readouterr().err
    assert main(["export", str(adapter_dir), "--format", "toy", "--out", str(tmp_path / "b.toy")]) == 0
    assert all(t.dtype == torch.float32 for t in load_file(tmp_path / "b.toy").values())
    assert main(["export", str(adapter_dir), "--format", "toy", "--adapter-only", "--out", str(tmp_path / "c.toy")]) == 2
    assert "--adapter-only is not available for --format toy" in capsys.readouterr().err


def test_the_help_table_of_builtin_quants_matches_the_registered_exporters():
    for name, quants in BUILTIN_QUANTS.items():
        cls = type(get(name))
        assert quants[0] == cls.default_quant and set(quants) == set(cls.quants), name
    assert set(BUILTIN_QUANTS) <= set(EXPORTERS) and set(BUILTIN_QUANTS) <= set(available())


def test_a_second_exporter_of_the_same_name_is_refused():
    with pytest.raises(TypeError, match="already registered"):
        class Other(Exporter, format="toy"):
            pass
