"""GPTQ export (Frantar et al. 2022, https://arxiv.org/abs/2210.17323): each Linear of each decoder layer
solved against its calibration Hessian (quant/wna16.py: `gptq`), layer by layer, so that later layers see
what the quantized earlier layers produce (export/calibration.py).

    leantune export runs/x --format gptq                          # 4-bit, group 128, sym: what vLLM loads
    leantune export runs/x --format gptq --quant pack_quantized   # the compressed-tensors layout

Written as GPTQ v1 (`quantize_config.json`, int32 qweight/qzeros, fp16 scales, g_idx), or as
compressed-tensors `pack-quantized`. Always symmetric with `desc_act: false`: vLLM 0.33 loads nothing else
(asymmetric GPTQ has no vLLM type; desc_act with groups is refused). `--act-order` is the static,
group-aware kind that vLLM loads: the solve order follows the Hessian's diagonal, the groups stay contiguous.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...quant import wna16 as math
from .. import wna16
from ..base import ExportOptions


class GPTQExporter(wna16.WNA16Exporter, format="gptq"):
    quants = ("GPTQ_V1", "PACK_QUANTIZED")
    default_quant = "GPTQ_V1"

    def write(self, model, tokenizer, facts, folder: Path, out: Path, quant: str | None,
              options: ExportOptions) -> dict:
        spec = wna16.options_spec("gptq", options.extra, sym=True)
        report = wna16.export(model, tokenizer, out, quant or self.default_quant, spec,
                              lambda layer, walk: solve(layer, walk, spec), options.extra, options.progress)
        report["merge"] = facts.as_dict()
        return report


def solve(layer: torch.nn.Module, walk, spec: wna16.Spec) -> dict[str, wna16.Packed]:
    """GPTQ on every Linear of `layer` (a copy, changed in place) with the walk's current inputs."""
    found = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    xtx: dict[str, torch.Tensor] = {}            # by the first Linear of each set reading one input
    tokens: dict[str, int] = {}
    reads: dict[str, str] = {}                   # Linear -> the first Linear that reads the same input
    last: dict = {"x": None, "name": None}       # q/k/v (gate/up) read one tensor: one X^T X, one solve

    def hook(name):
        def accumulate(module, args):
            x = args[0]
            if x is not last["x"]:
                flat = x.reshape(-1, x.shape[-1]).float()          # (tokens, in)
                last["x"], last["name"] = x, reads.setdefault(name, name)
                xtx[last["name"]] = xtx.get(last["name"], 0) + flat.T @ flat
                tokens[last["name"]] = tokens.get(last["name"], 0) + flat.shape[0]
            else:
                reads.setdefault(name, last["name"])
        return accumulate

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in found.items()]
    try:
        walk.run(layer)
    finally:
        for h in handles:
            h.remove()
    last.clear()
    packed = {}
    for first in xtx:
        names = [n for n in found if reads.get(n) == first]
        h = 2.0 * xtx[first] / max(tokens[first], 1)                # H = 2 X^T X / N
        w = torch.cat([found[n].weight for n in names])             # rows are solved independently: one call
        codes, scale, zero = math.gptq(w, h, spec.bits, spec.group_size, sym=spec.sym, damp=spec.damp,
                                       act_order=spec.act_order, scale_dtype=spec.scale_dtype,
                                       static_groups=spec.static_groups)
        row = 0
        for n in names:
            rows = slice(row, row + found[n].out_features)
            packed[n] = wna16.packed_of(codes[rows], scale[rows], zero[rows])
            wna16.set_weight(found[n], packed[n])
            row = rows.stop
    return packed
