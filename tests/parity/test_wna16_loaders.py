"""GPTQ and AWQ folders against the loaders that read them.

* compressed-tensors `pack-quantized` (GPTQ sym, AWQ asym): loaded live by transformers 5.24 with
  compressed-tensors 0.20 (its own unpacking and dequantization), logits against our own read-back.
* GPTQ v1 and AWQ GEMM: vLLM cannot run here, so its loader rules (vLLM 0.33 `auto_gptq.py`, `auto_awq.py`,
  the CPU kernel's checks; research/next-wave.md section 1.1) are checked statically, and the tensors are
  unpacked by an unpacker written here from those rules, not from ours. A folder packed in the natural
  column order instead of AWQ's must fail that check (the negative control: such a file loads silently).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from leantune.export import wna16
from leantune.export.base import ExportOptions, get
from leantune.quant import wna16 as packing
from tests.conftest import CORPUS

GROUP = 32


@pytest.fixture(scope="module")
def exported(tiny_llama_dir, tmp_path_factory):
    """(format, layout) -> the folder written from the tiny Llama, 4-bit, group 32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from leantune.infer.materialize import Facts

    root = tmp_path_factory.mktemp("wna16")
    calib = root / "calib.txt"
    calib.write_text("\n".join(CORPUS[:40]) + "\n")
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    facts = Facts(base_model=str(tiny_llama_dir), adapter=None, method=None, base="16-bit", quant_bits=None,
                  quant_type=None, chat_template=None, system_prompt=None, checkpoint_dtype="float32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folders = {}
    for fmt, layout in [("gptq", "GPTQ_V1"), ("gptq", "PACK_QUANTIZED"), ("awq", "GEMM"), ("awq", "PACK_QUANTIZED")]:
        out = root / f"{fmt}-{layout.lower()}"
        options = ExportOptions(progress=False, extra={"group_size": GROUP, "calibration": str(calib),
                                                       "calibration_samples": 8, "calibration_seq": 32})
        get(fmt).write(model, tok, facts, tiny_llama_dir, out, layout, options)
        folders[fmt, layout] = out
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)     # the source model is left as it was
    return folders


IDS = torch.tensor([[1, 17, 40, 99, 23, 250, 8, 77, 150, 3, 64, 12]])


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def test_gptq_pack_quantized_loads_in_transformers_with_compressed_tensors_and_matches_our_read_back(exported):
    from transformers import AutoModelForCausalLM

    folder = exported["gptq", "PACK_QUANTIZED"]
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["symmetric"] is True
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ours = wna16.load_back(folder)
    # they dequantize in the scales' 16-bit dtype, we in float32: the format's rounding
    assert (logits(theirs) - logits(ours)).abs().max() < 2e-2
    assert torch.equal(logits(theirs).argmax(-1), logits(ours).argmax(-1))
    q = dict(theirs.named_modules())["model.layers.0.self_attn.q_proj"]
    w = ours.model.layers[0].self_attn.q_proj.weight
    assert (q.weight.float() - w).abs().max() <= 1e-2 * w.abs().max()


def test_awq_pack_quantized_decompresses_with_compressed_tensors_to_our_weights(exported):
    """Asymmetric pack-quantized through compressed-tensors' own decompressor, module by module.

    Not through transformers' from_pretrained: with compressed-tensors 0.20 it builds the compressed model's
    weight_zero_point unpacked, (out, groups), while the same library's compressor writes it, and its
    decompressor reads it, packed along out, (out/8, groups) (checked: a 128x64 group-32 Linear compresses
    to a (16, 2) int32 zero point), so every asymmetric group checkpoint is refused as a size mismatch.
    vLLM reads the packed form (CompressedTensorsWNA16)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    folder = exported["awq", "PACK_QUANTIZED"]
    group = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["weights"]["symmetric"] is False
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]))
    raw = load_file(folder / "model.safetensors")
    ours = wna16.load_back(folder).state_dict()
    names = modules(raw, "weight_packed")
    assert len(names) == 14
    for m in names:
        parts = {k.removeprefix(m + "."): v for k, v in raw.items() if k.startswith(m + ".")}
        assert parts["weight_zero_point"].dtype == torch.int32
        theirs = PackedQuantizationCompressor.decompress(parts, scheme)["weight"].float()
        w = ours[f"{m}.weight"]
        assert (theirs - w).abs().max() <= 1e-3 * w.abs().max()      # fp16 products vs float32: rounding only


# ---------------------------------------------------------------------------------------------------------
# vLLM's rules, checked statically, and an unpacker written from them


def vllm_unpack_gptq(t: dict, bits: int) -> torch.Tensor:
    """GPTQ v1 as vLLM reads it: qweight (in*bits/32, out) with input row 32/bits*r + j at bits [bits*j, ...) of
    row r; qzeros (groups, out*bits/32) likewise along out, holding zero - 1; w = (q - zero) * scales[g_idx]."""
    k = 32 // bits
    mask = 2 ** bits - 1
    qw = t["qweight"].to(torch.int64) & 0xFFFFFFFF
    rows, out = qw.shape
    q = torch.empty(rows * k, out, dtype=torch.int64)
    for j in range(k):
        q[j::k] = (qw >> (bits * j)) & mask
    qz = t["qzeros"].to(torch.int64) & 0xFFFFFFFF
    z = torch.empty(qz.shape[0], qz.shape[1] * k, dtype=torch.int64)
    for j in range(k):
        z[:, j::k] = ((qz >> (bits * j)) & mask) + 1
    g = t["g_idx"].long()
    return ((q - z[g]) * t["scales"].float()[g]).T                    # (out, in)


VLLM_REVERSE_AWQ_PACK_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]


def vllm_unpack_awq(t: dict, group: int) -> torch.Tensor:
    """AWQ GEMM as vLLM reads it: nibble p (bits 4p) of each int32 of qweight (in, out/8), reordered by
    _REVERSE_AWQ_PACK_ORDER, gives 8 consecutive output columns; qzeros the same, no offset."""
    def nibbles(x):
        x = x.to(torch.int64) & 0xFFFFFFFF
        n = torch.stack([(x >> (4 * p)) & 0xF for p in range(8)], dim=-1)        # (rows, out/8, 8) in pack order
        return n[..., VLLM_REVERSE_AWQ_PACK_ORDER].reshape(x.shape[0], -1)
    q, z = nibbles(t["qweight"]), nibbles(t["qzeros"])
    g = torch.arange(q.shape[0]) // group
    return ((q - z[g]) * t["scales"].float()[g]).T


def modules(raw: dict, leaf: str) -> list[str]:
    return sorted(k.removesuffix("." + leaf) for k in raw if k.endswith("." + leaf))


def test_gptq_v1_follows_vllms_rules_and_unpacks_independently_to_our_weights(exported):
    folder = exported["gptq", "GPTQ_V1"]
    qc = json.loads((folder / "quantize_config.json").read_text())
    assert json.loads((folder / "config.json").read_text())["quantization_config"] == qc
    # AutoGPTQConfig: TYPE_MAP has (4, sym) and (8, sym) only; desc_act with groups is refused
    assert (qc["quant_method"], qc["bits"], qc["sym"], qc["desc_act"], qc["group_size"]) == ("gptq", 4, True, False, GROUP)
    raw = load_file(folder / "model.safetensors")
    names = modules(raw, "qweight")
    assert len(names) == 14 and not any("lm_head" in n or "embed" in n for n in names)
    ours = wna16.load_back(folder).state_dict()
    for m in names:
        t = {k: raw[f"{m}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
        out, n_in = ours[f"{m}.weight"].shape
        assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (n_in // 8, out)
        assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (n_in // GROUP, out // 8)
        assert t["scales"].dtype == torch.float16 and t["scales"].shape == (n_in // GROUP, out)
        assert torch.equal(t["g_idx"].long(), torch.arange(n_in) // GROUP)     # static order: trivial g_idx
        assert f"{m}.weight" not in raw
        torch.testing.assert_close(vllm_unpack_gptq(t, 4), ours[f"{m}.weight"], rtol=0, atol=0)


def test_awq_gemm_follows_vllms_rules_and_a_wrong_pack_order_fails_the_check(exported):
    folder = exported["awq", "GEMM"]
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["zero_point"], qc["version"]) == ("awq", 4, GROUP, True, "gemm")
    raw = load_file(folder / "model.safetensors")
    ours = wna16.load_back(folder).state_dict()
    names = modules(raw, "qweight")
    assert len(names) == 14
    wrong_max = 0.0
    for m in names:
        t = {k: raw[f"{m}.{k}"] for k in ("qweight", "qzeros", "scales")}
        out, n_in = ours[f"{m}.weight"].shape
        assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (n_in, out // 8)
        assert t["qzeros"].shape == (n_in // GROUP, out // 8) and t["scales"].shape == (n_in // GROUP, out)
        torch.testing.assert_close(vllm_unpack_awq(t, GROUP), ours[f"{m}.weight"], rtol=0, atol=0)
        # negative control: the same codes packed in natural column order
        codes, scale, zero = packing.unpack_awq(t)
        natural = packing.pack_awq(codes, scale, zero, order=tuple(range(8)))
        wrong = vllm_unpack_awq(natural, GROUP)
        wrong_max = max(wrong_max, float((wrong - ours[f"{m}.weight"]).abs().max() / ours[f"{m}.weight"].abs().max()))
    assert wrong_max > 0.5                                              # the check sees the wrong layout


def test_a_wrong_awq_order_is_far_off_in_logits_while_the_right_one_is_at_rounding(exported, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    folder = exported["awq", "GEMM"]
    raw = load_file(folder / "model.safetensors")
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    right = wna16.load_back(folder)
    wrong = wna16.load_back(folder)
    state = {}
    for m in modules(raw, "qweight"):
        t = {k: raw[f"{m}.{k}"] for k in ("qweight", "qzeros", "scales")}
        state[f"{m}.weight"] = vllm_unpack_awq(packing.pack_awq(*packing.unpack_awq(t), order=tuple(range(8))), GROUP)
    wrong.load_state_dict(state, strict=False)
    ref = logits(reference)
    right_err, wrong_err = (logits(right) - ref).abs().max(), (logits(wrong) - ref).abs().max()
    assert wrong_err > 3 * right_err
