"""INT8: the merged model as an HF folder with every Linear but the output head stored in 8 bits.

    --quant W8A16      (default) weight-only int8 per output channel, compressed-tensors `pack-quantized`:
                       loads in transformers through compressed-tensors (any device, CPU included) and in
                       vLLM (`CompressedTensorsWNA16`, GPU: Marlin uint8b128; vLLM's CPU backend has no
                       W8A16 kernel).
    --quant W8A8       the same int8 weights in compressed-tensors `int-quantized` (its preset "W8A8"), plus
                       int8 activations rounded per token at run time: the int8 folder vLLM's CPU backend
                       serves (`CompressedTensorsW8A8Int8`, oneDNN; AVX2 is enough, but without VNNI its
                       GEMM saturates: `VLLM_CPU_NO_VNNI`), and its GPU one (CUTLASS).
    --quant LLM_INT8   LLM.int8 as bitsandbytes quantizes it and transformers serializes it (`weight` int8,
                       `SCB`, `weight_format`; config `quantization_config.quant_method: bitsandbytes`):
                       loads in transformers with bitsandbytes installed; vLLM core dropped bitsandbytes
                       (0.28: the out-of-tree vllm-bnb-plugin reads it).

W8A16 is the default because more runtimes load it (vLLM core and transformers, without bitsandbytes);
all three store the same kind of numbers (per-row absmax int8). W8A8 also rounds activations, which costs
more than the weights' rounding where activations have outliers (SmolLM2-135M: KL 14x W8A16's); our
read-back (`load_int8_folder`) simulates that rounding, so its fidelity report measures what vLLM computes
with exact int8 GEMMs (GPUs, VNNI CPUs). `VLLM` below is where each one runs in vLLM.
`layouts.py` holds the math and the on-disk layout of one weight; this file writes and reads the folder.
Embeddings, norms and the output head stay in the checkpoint's own dtype, as the libraries expect.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ...errors import ModelError
from ...io.atomic import atomic_dir
from ...io.outputs import write_manifest
from ..wna16 import VLLM_CPU_8BIT
from ...quant.loader import params_on_meta, quantizable_linears
from ...quant.spec import QuantSpec, quantization_config_dict
from ..base import Exporter, ExportOptions
from . import layouts

WEIGHTS = "model.safetensors"
CT_VERSION = "0.20.0"   # the compressed-tensors release whose config fields W8A8's config.json follows

# vllm-cpu 0.32 serves W8A8 on an AVX2 CPU, but without VNNI its oneDNN int8 GEMM sums u8 x s8 pairs in saturating
# int16 (vpmaddubsw): 0.047 off in logprob on the test model where W8A8 itself moves 0.007 (test_vllm_int8.py).
VLLM_CPU_NO_VNNI = ("W8A8: vLLM serves it on GPUs and CPUs, but on an x86 CPU without VNNI (no avx512_vnni or "
                    "avx_vnni in /proc/cpuinfo) vllm-cpu's int8 GEMM saturates at int16 and its outputs drift; "
                    "serve it on a GPU or a VNNI CPU")

# Where vLLM runs each quant (what it serves, the warning the export prints), checked live with vllm-cpu 0.32 on
# an AVX2 CPU (tests/parity/test_vllm_int8.py, test_vllm_wna16.py) and from vLLM's source for GPUs.
VLLM = {
    "W8A16": ("GPU (CompressedTensorsWNA16, Marlin)", VLLM_CPU_8BIT),
    "W8A8": ("CPU (CompressedTensorsW8A8Int8, oneDNN int8 GEMM) and GPU (CUTLASS)", VLLM_CPU_NO_VNNI),
    "LLM_INT8": ("not vLLM core (bitsandbytes left it in 0.28; the out-of-tree vllm-bnb-plugin)", None),
}


class Int8Exporter(Exporter, format="int8"):
    quants = ("W8A16", "W8A8", "LLM_INT8")
    default_quant = "W8A16"
    writes_folder = True

    def check_source(self, folder: Path) -> None:
        if not (folder / "config.json").is_file():
            raise ModelError(f"{folder} has no config.json; --format int8 writes an HF model folder and needs one")

    def write(self, model, tokenizer, facts, folder: Path, out: Path, quant: str | None,
              options: ExportOptions) -> dict:
        dtype = getattr(torch, facts.checkpoint_dtype, torch.float32)
        dtype = dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
        head = model.get_output_embeddings()
        paths = quantizable_linears(model, keep=[head] if head is not None else [])
        tensors = stored_tensors(model, paths, quant, dtype)
        config = model.config.to_dict()
        config["dtype"] = str(dtype).removeprefix("torch.")
        config["quantization_config"] = (w8a16_config(model, head) if quant == "W8A16"
                                         else w8a8_config(model, head) if quant == "W8A8"
                                         else quantization_config_dict(QuantSpec(bits=8)))
        with atomic_dir(out) as tmp:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_manifest(tmp)
        warnings = [VLLM[quant][1]] if VLLM[quant][1] else []
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        return {"linears_quantized": len(paths), "stored_dtype": str(dtype).removeprefix("torch."),
                "warnings": warnings}

    def load_back(self, out: Path) -> nn.Module:
        return load_int8_folder(out)


def stored_tensors(model, paths: list[str], quant: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict as stored: the Linear weights at `paths` quantized, the rest in `dtype`, tied once."""
    quantized = {f"{p}.weight" for p in paths}
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        if t.data_ptr() in seen:   # a tied weight (lm_head = embed_tokens): stored once, as save_pretrained does
            continue
        seen.add(t.data_ptr())
        if key in quantized:
            stem = key.removesuffix(".weight")
            parts = quantized_tensors(t, quant, dtype)
            out.update({f"{stem}.{k}": v for k, v in parts.items()})
        else:
            out[key] = t.detach().to(dtype if t.is_floating_point() else t.dtype).contiguous()
    return out


def quantized_tensors(w: torch.Tensor, quant: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """One Linear weight's stored tensors, by name under the Linear, in `quant`'s layout."""
    if quant == "W8A16":
        return layouts.w8a16_tensors(w, dtype)
    if quant == "W8A8":
        return layouts.w8a8_tensors(w, dtype)
    return layouts.llm_int8_tensors(w)


def w8a16_config(model, head) -> dict:
    """compressed-tensors' quantization_config (0.20's field names) for per-channel symmetric int8 weights."""
    names = [n for n, m in model.named_modules() if m is head] if head is not None else []
    scheme = {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                                 "strategy": "channel", "dynamic": False},
              "input_activations": None, "output_activations": None, "format": "pack-quantized"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": scheme}, "ignore": names, "kv_cache_scheme": None,
            "global_compression_ratio": None}


def w8a8_config(model, head) -> dict:
    """What compressed-tensors 0.20 writes for its preset "W8A8" saved as `int-quantized` (ModelCompressor.
    update_config): int8 weights per channel, int8 inputs per token, dynamic, both symmetric."""
    names = [n for n, m in model.named_modules() if m is head] if head is not None else []
    int8 = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None}
    scheme = {"targets": ["Linear"], "weights": {**int8, "strategy": "channel", "dynamic": False},
              "input_activations": {**int8, "strategy": "token", "dynamic": True},
              "output_activations": None, "format": "int-quantized"}
    return {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": scheme}, "ignore": names, "kv_cache_scheme": None,
            "global_compression_ratio": None, "moe_sparsity_config": None, "sparsity_config": {},
            "transform_config": {}, "version": CT_VERSION}


def simulate_int8_inputs(model: nn.Module, paths: list[str]) -> None:
    """Round the input of each Linear at `paths` to int8 per token on every forward (W8A8's runtime)."""
    for path in paths:
        model.get_submodule(path).register_forward_pre_hook(
            lambda _module, args: (layouts.fake_quantize_per_token(args[0]), *args[1:]))


def load_int8_folder(out: Path) -> nn.Module:
    """Our own reader: the folder's model in float32 with every quantized weight dequantized from disk; for
    W8A8 those Linears also round their inputs per token as the runtime does (`simulate_int8_inputs`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(out)
    qc = getattr(config, "quantization_config", None) or {}
    fmt = qc.get("format") if qc.get("quant_method") == "compressed-tensors" else None
    if hasattr(config, "quantization_config"):
        del config.quantization_config   # we dequantize ourselves: a plain float model
    with safe_open(str(out / WEIGHTS), "pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    state: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[str, torch.Tensor]] = {}
    marker = {"pack-quantized": "weight_packed", "int-quantized": "weight_scale"}.get(fmt, "SCB")
    stems = {k.removesuffix(f".{marker}") for k in stored if k.endswith(f".{marker}")}
    for key, t in stored.items():
        stem, _, leaf = key.rpartition(".")
        if stem in stems:
            groups.setdefault(stem, {})[leaf] = t
        else:
            state[key] = t.float() if t.is_floating_point() else t
    decode = {"pack-quantized": layouts.w8a16_weight, "int-quantized": layouts.w8a8_weight}.get(
        fmt, layouts.llm_int8_weight)
    state.update({f"{stem}.weight": decode(parts) for stem, parts in groups.items()})
    with params_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    left = [k for k in missing if any(p.is_meta for n, p in model.named_parameters() if n == k)]
    if left or unexpected:
        raise ModelError(f"{out} does not match its config.json (missing {left[:3]}, unexpected {unexpected[:3]}); "
                         f"re-export it")
    if fmt == "int-quantized":
        simulate_int8_inputs(model, sorted(groups))
    return model.eval()
