"""INT8 export on the tiny Llama, checked live against the libraries that load it:

* W8A16: our packing is compressed-tensors' own `pack_to_int32` bit for bit (a byte-order negative
  control fails); the folder loads in transformers through compressed-tensors 0.20 with logits equal to
  our read-back; every weight is within half a step of the source;
* W8A8: the folder is what compressed-tensors 0.20 itself writes (preset "W8A8", format `int-quantized`) for
  the same weights and scales, config and tensors (float32; in bf16 its codes differ only where its bf16
  division rounds, and ours are never further from the weight); it loads in transformers, whose logits
  equal our read-back once both round activations the same way (compressed-tensors' fake quantization takes
  absmax / 127.5 per token, vLLM's int8 kernels absmax / 127; our read-back simulates vLLM's);
* LLM.int8: the stored tensors are exactly what transformers + bitsandbytes save when they quantize the
  same model themselves, and the folder reloads through them;
* the common fidelity report lands beside the folder; bad input is one line, exit 2, nothing written.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from leantune.cli.main import main
from leantune.export.int8 import layouts, load_int8_folder

IDS = torch.tensor([[5, 17, 42, 99, 7, 230, 11, 64, 300, 2]])


def _export(src, out, quant=None, *extra) -> int:
    return main(["export", str(src), "--format", "int8", "--out", str(out), "--quiet",
                 *(["--quant", quant] if quant else []), *extra])


@pytest.fixture(scope="module")
def folders(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("int8")
    assert _export(tiny_llama_dir, tmp / "w8a16") == 0                  # the default quant
    assert _export(tiny_llama_dir, tmp / "llm", "llm_int8") == 0
    assert _export(tiny_llama_dir, tmp / "w8a8", "w8a8") == 0
    return tmp


def _source(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.mark.parametrize("cols", [64, 70, 7])
def test_w8a16_packing_is_compressed_tensors_own_and_round_trips(cols):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = torch.randint(-127, 128, (5, cols), generator=torch.Generator().manual_seed(cols), dtype=torch.int8)
    q[0, :3] = torch.tensor([-127, 127, 0], dtype=torch.int8)
    ours = layouts.pack_int8(q)
    assert ours.dtype == torch.int32 and torch.equal(ours, pack_to_int32(q, 8))
    assert torch.equal(layouts.unpack_int8(ours, tuple(q.shape)), q)
    # negative control: the same bytes in the other order are a different tensor, and the check sees it
    u = (q.to(torch.int64) + 128)
    u = torch.nn.functional.pad(u, (0, -cols % 4)).view(5, -1, 4).flip(-1)
    wrong = (u << (8 * torch.arange(4))).sum(-1)
    assert not torch.equal(torch.where(wrong >= 2**31, wrong - 2**32, wrong).to(torch.int32), pack_to_int32(q, 8))


def test_w8a16_folder_loads_in_transformers_with_our_logits(folders, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    out = folders / "w8a16"
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["config_groups"]["group_0"]["weights"]["num_bits"] == 8 and qc["ignore"] == ["lm_head"]
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()   # compressed-tensors decompresses
    ours = load_int8_folder(out)
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits.float(), ours(IDS).logits, rtol=0, atol=1e-5)
    src = _source(tiny_llama_dir)
    for name, p in src.named_parameters():
        back = ours.get_parameter(name)
        if name.endswith("proj.weight"):          # quantized: within half a step of the source, per row
            step = p.abs().amax(1, keepdim=True) / 127
            assert ((back - p).abs() <= step / 2 + 1e-7).all(), name
            assert not torch.equal(back, p)
        else:
            torch.testing.assert_close(back, p, rtol=0, atol=0)        # fp32 checkpoint: kept exactly
    stored = load_file(out / "model.safetensors")
    assert stored["model.layers.0.mlp.up_proj.weight_packed"].dtype == torch.int32
    assert stored["model.layers.0.mlp.up_proj.weight_packed"].shape == (128, 64 // 4)
    assert stored["model.layers.0.mlp.up_proj.weight_scale"].shape == (128, 1)


def _compressed_tensors_w8a8(source, out):
    """The folder compressed-tensors 0.20 itself writes: preset "W8A8" applied, our scales (absmax / 127: the
    observer's choice, not the format's) put in, its own compressor (its quantize()) and save path."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    qc = QuantizationConfig(config_groups={"group_0": preset_name_to_scheme("W8A8", ["Linear"])}, ignore=["lm_head"])
    apply_quantization_config(source, qc)
    for module in source.modules():
        if hasattr(module, "weight_scale"):
            module.weight_scale.data.copy_(module.weight.float().abs().amax(1, keepdim=True) / 127)
    compressor = ModelCompressor.from_pretrained_model(source, quantization_format="int-quantized")
    compressor.compress_model(source)
    source.save_pretrained(out)
    compressor.update_config(out)
    return load_file(out / "model.safetensors"), json.loads((out / "config.json").read_text())["quantization_config"]


def test_w8a8_folder_is_what_compressed_tensors_writes_itself(folders, tiny_llama_dir, tmp_path):
    theirs, their_config = _compressed_tensors_w8a8(_source(tiny_llama_dir), tmp_path / "oracle")
    ours = load_file(folders / "w8a8" / "model.safetensors")
    assert set(ours) == set(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and torch.equal(ours[key], t), key
    assert ours["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert json.loads((folders / "w8a8" / "config.json").read_text())["quantization_config"] == their_config


def test_w8a8_in_bf16_differs_from_compressed_tensors_only_where_its_bf16_division_rounds(tiny_llama_dir, tmp_path):
    """A bf16 checkpoint: compressed-tensors divides weight by scale in bf16 (8 significant bits), so quotients
    above 64 land on a half-step grid before rounding and about 10% of its codes are one off the nearest; ours
    divide in float32. Everything else is equal, and ours is never further from the weight."""
    from transformers import AutoModelForCausalLM

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).save_pretrained(src)
    for f in tiny_llama_dir.glob("tok*"):
        (src / f.name).write_bytes(f.read_bytes())
    assert _export(src, tmp_path / "ours", "w8a8") == 0
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    theirs, their_config = _compressed_tensors_w8a8(
        AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16), tmp_path / "oracle")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"] == their_config
    weights = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).state_dict()
    assert set(ours) == set(theirs)
    differ = 0
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype, key
        if t.dtype != torch.int8:
            assert torch.equal(ours[key], t), key                # scales, norms, embeddings, head: equal
            continue
        w, scale = weights[key], ours[f"{key}_scale"]
        assert torch.equal(t, torch.round(w / scale).clamp(-128, 127).to(torch.int8)), key   # their bf16 division
        assert (ours[key].int() - t.int()).abs().max() <= 1, key
        error = lambda q: (q.float() * scale.float() - w.float()).abs()   # noqa: E731
        assert (error(ours[key]) <= error(t)).all(), key
        differ += int((ours[key] != t).sum())
    assert differ > 0                                             # the check can see a difference


def test_w8a8_loads_in_transformers_and_our_read_back_rounds_activations_per_token(folders):
    from transformers import AutoModelForCausalLM

    from leantune.export.int8 import layouts

    out = folders / "w8a8"
    theirs = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    assert theirs.model.layers[0].self_attn.q_proj.weight.dtype == torch.int8      # served compressed
    ours = load_int8_folder(out)
    hooked = [n for n, m in ours.named_modules() if m._forward_pre_hooks]
    assert len(hooked) == 14 and "lm_head" not in hooked                          # every quantized Linear
    with torch.no_grad():
        vllm_like = ours(IDS).logits
        for n in hooked:                      # compressed-tensors' own rounding: absmax / 127.5, range [-128, 127]
            m = ours.get_submodule(n)
            m._forward_pre_hooks.clear()
            m.register_forward_pre_hook(lambda _m, a: (_ct_fake_quant(a[0]),))
        ct_like = ours(IDS).logits
        for n in hooked:
            ours.get_submodule(n)._forward_pre_hooks.clear()
        weights_only = ours(IDS).logits
        torch.testing.assert_close(theirs(IDS).logits.float(), ct_like, rtol=0, atol=1e-5)
    # the activation rounding is there and is a different rounding from compressed-tensors' (127 vs 127.5)
    assert (vllm_like - weights_only).abs().max() > 1e-4 and (vllm_like - ct_like).abs().max() > 1e-4
    x = torch.randn(3, 5, 64)
    q = layouts.fake_quantize_per_token(x)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert ((q - x).abs() <= step / 2 + 1e-7).all() and torch.equal(q.abs().amax(-1), x.abs().amax(-1))
    assert torch.equal(layouts.fake_quantize_per_token(torch.zeros(2, 4)), torch.zeros(2, 4))


def _ct_fake_quant(x: torch.Tensor) -> torch.Tensor:
    scale = x.abs().amax(-1, keepdim=True) / 127.5
    return torch.round(x / scale).clamp(-128, 127) * scale


def test_llm_int8_tensors_are_what_transformers_and_bitsandbytes_save(folders, tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    oracle = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, device_map="cpu",
                                                  quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    oracle.save_pretrained(tmp_path / "oracle")
    theirs = load_file(tmp_path / "oracle" / "model.safetensors")
    ours = load_file(folders / "llm" / "model.safetensors")
    assert set(ours) == set(theirs)
    for key, t in theirs.items():
        assert ours[key].dtype == t.dtype and ours[key].shape == t.shape, key
        assert torch.equal(ours[key], t), key
    qc = json.loads((folders / "llm" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_8bit"] is True
    reloaded = AutoModelForCausalLM.from_pretrained(folders / "llm", device_map="cpu").eval()
    layer = reloaded.model.layers[1].mlp.down_proj
    assert type(layer).__name__ == "Linear8bitLt"
    assert torch.equal(layer.weight.data, ours["model.layers.1.mlp.down_proj.weight"])
    with torch.no_grad():   # bitsandbytes quantizes activations too (fp16): close, not equal, to our read-back
        a, b = reloaded(IDS).logits.float(), load_int8_folder(folders / "llm")(IDS).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()


def test_each_quant_warns_where_vllm_cpu_falls_short(tiny_llama_dir, tmp_path, capsys):
    from leantune.export.int8 import VLLM, VLLM_CPU_NO_VNNI
    from leantune.export.wna16 import VLLM_CPU_8BIT

    assert set(VLLM) == {"W8A16", "W8A8", "LLM_INT8"}
    for quant, warning in (("w8a16", VLLM_CPU_8BIT), ("w8a8", VLLM_CPU_NO_VNNI), ("llm_int8", None)):
        capsys.readouterr()
        assert _export(tiny_llama_dir, tmp_path / quant, quant) == 0
        err = capsys.readouterr().err
        assert (f"warning: {warning}" in err) if warning else ("warning:" not in err), (quant, err)


def test_the_fidelity_report_sits_beside_the_folder(folders):
    for name, quant in (("w8a16", "W8A16"), ("llm", "LLM_INT8"), ("w8a8", "W8A8")):
        report = json.loads((folders / f"{name}.fidelity.json").read_text())
        assert report["format"] == "int8" and report["quant"] == quant and report["file"] == name
        assert report["file_bytes"] == sum(f.stat().st_size for f in (folders / name).rglob("*") if f.is_file())
        # linears in 8 bits (+ a scale per row), embeddings and head in fp32: between 8 and 32
        assert 8 < report["bits_per_weight"] < 32
        assert report["peak_rss_bytes"] >= report["rss_before_bytes"] > 0 and report["export_seconds"] >= 0
        m = report["model"]
        assert m["top1_agreement"] > 0.95 and 0 <= m["kl_mean"] < 1e-3 and abs(m["perplexity_delta_pct"]) < 1


def test_bad_input_is_one_line_exit_2_and_nothing_written(tiny_llama_dir, folders, tmp_path, capsys, monkeypatch):
    def one_line_error(*needles):
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        for n in needles:
            assert n in err, err

    assert main(["export", str(tiny_llama_dir), "--format", "int4", "--out", str(tmp_path / "a")]) == 2
    one_line_error("unknown export format 'int4'", "int8")
    assert _export(tiny_llama_dir, tmp_path / "b", "int4") == 2
    one_line_error("not a int8 quant type; choose one of W8A16, W8A8, LLM_INT8")
    before = sorted(p.name for p in (folders / "w8a16").iterdir())
    assert _export(tiny_llama_dir, folders / "w8a16") == 2                 # an existing output folder
    one_line_error("--overwrite")
    assert sorted(p.name for p in (folders / "w8a16").iterdir()) == before
    import leantune.export.int8 as int8

    monkeypatch.setattr(int8, "save_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):                      # a failure midway leaves nothing
        _export(tiny_llama_dir, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
