"""AWQ export (Lin et al. 2023, https://arxiv.org/abs/2306.00978): activation-aware scaling, then
asymmetric group round-to-nearest, layer by layer over calibration data (export/calibration.py).

    leantune export runs/x --format awq                          # 4-bit, group 128, AWQ GEMM layout
    leantune export runs/x --format awq --quant pack_quantized   # compressed-tensors (asym, weight_zero_point)

Per layer group (the Linears that read one input, and the op that produces it):
    q, k, v   after input_layernorm           gate, up  after post_attention_layernorm
    o         after v (when v's outputs are o's inputs: no grouped-query heads)   down  after up
with x the group's calibration inputs and s = mean_t |x_t| ^ alpha (normalised by sqrt(max s * min s)),
alpha in {0, 1/GRID, ..., (GRID-1)/GRID} is chosen to minimise || x W^T - (x / s) Q(W diag(s))^T ||^2 (alpha = 0 is
plain round-to-nearest, so the search never does worse than it on this objective); then s is folded:
W <- W diag(s) and the producing op's output divided by s (a norm's weight, a Linear's rows), which leaves
the float model's function unchanged. Then every Linear but q/k is clipped per group to the max |w| whose
quantized group output is closest (quant/wna16.py: `clip_search`), and rounded.

A norm that is not y = w * norm(x) (Gemma's 1 + w) is not folded into; its group is left unscaled.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ...errors import ConfigError
from ...quant import wna16 as math
from .. import wna16
from ..base import ExportOptions

GRID = 10                   # alpha in {0, 0.1, ..., 0.9} (AutoAWQ: 20 points; 10 halves the CPU time)
SEARCH_TOKENS = 128         # calibration tokens the scale search scores on (evenly spaced; the clip search half)
CLIP_STEPS = 10             # clip ratios 1, 0.95, ..., 0.55 of max |w| (AutoAWQ: 20 steps down to 0.5)


class AWQExporter(wna16.WNA16Exporter, format="awq"):
    quants = ("GEMM", "PACK_QUANTIZED")
    default_quant = "GEMM"

    def write(self, model, tokenizer, facts, folder: Path, out: Path, quant: str | None,
              options: ExportOptions) -> dict:
        spec = wna16.options_spec("awq", options.extra, sym=False)
        if spec.act_order:
            raise ConfigError("--act-order is a GPTQ option; drop it for --format awq")
        clip = bool(options.extra.get("awq_clip", True))
        report = wna16.export(model, tokenizer, out, quant or self.default_quant, spec,
                              lambda layer, walk: solve(layer, walk, spec, clip=clip), options.extra, options.progress)
        report["clip_search"] = clip
        report["merge"] = facts.as_dict()
        return report


def _sample(x: torch.Tensor, n: int) -> torch.Tensor:
    """n rows of x (tokens, in), evenly spaced (deterministic)."""
    if x.shape[0] <= n:
        return x
    return x[torch.linspace(0, x.shape[0] - 1, n).long()]


def _foldable(prev) -> bool:
    if isinstance(prev, torch.nn.Linear):
        return True
    return getattr(prev, "weight", None) is not None and "gemma" not in type(prev).__name__.lower()


@math.one_thread()
def search_scale(x: torch.Tensor, weights: list[torch.Tensor], spec: wna16.Spec, grid: int = GRID) -> torch.Tensor:
    """The s = mean|x|^alpha (in,) of the best alpha for Linears `weights` reading inputs x (tokens, in)."""
    mean = x.abs().mean(0)                                     # (in,) over every calibration token
    xs = _sample(x, SEARCH_TOKENS).float()
    w = torch.cat(weights, 0).float()                          # (sum of outs, in)
    ref = xs @ w.T
    best, best_s = float("inf"), torch.ones_like(mean)
    for k in range(grid):
        s = mean.pow(k / grid).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        codes, sc, z = math.rtn(w * s, spec.bits, spec.group_size, sym=spec.sym, scale_dtype=spec.scale_dtype)
        err = float((xs @ (math.dequantize(codes, sc, z) / s).T - ref).pow(2).mean())
        if err < best:
            best, best_s = err, s
    return best_s


@torch.no_grad()
def solve(layer: torch.nn.Module, walk, spec: wna16.Spec, clip: bool = True) -> dict[str, wna16.Packed]:
    """AWQ on `layer` (a copy, changed in place) with the walk's current inputs (see the module docstring)."""
    found = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
    seen: dict[str, list[torch.Tensor]] = {n: [] for n in found}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen[n].append(args[0].detach()))
               for n, m in found.items()]
    try:
        walk.run(layer)
    finally:
        for h in handles:
            h.remove()
    x: dict[str, torch.Tensor] = {}                            # (tokens, in); q/k/v (gate/up) share one tensor
    joined: dict[tuple[int, ...], torch.Tensor] = {}
    for n, ts in seen.items():
        key = tuple(id(t) for t in ts)
        if key not in joined:
            joined[key] = torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]).float()
        x[n] = joined[key]
    joined.clear()
    seen.clear()
    inputs_scale = {n: torch.ones(m.in_features) for n, m in found.items()}   # the inputs are now x / s
    modules = dict(layer.named_modules())
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    probe = walk.inputs[0][:1], walk.kwargs[0]
    expected = _out(layer(probe[0], **probe[1]))
    for prev, names in _groups(modules, found):
        lins = [found[n] for n in names]
        if not _foldable(modules[prev]) or len({lin.in_features for lin in lins}) != 1:
            continue
        s = search_scale(x[names[0]], [lin.weight for lin in lins], spec)
        p = modules[prev]
        if isinstance(p, torch.nn.Linear):                     # its outputs are the group's inputs
            p.weight.div_(s[:, None])
        else:
            p.weight.div_(s)
        if getattr(p, "bias", None) is not None:
            p.bias.div_(s)
        for n, lin in zip(names, lins):
            lin.weight.mul_(s[None, :])
            inputs_scale[n] = s
    got = _out(layer(probe[0], **probe[1]))
    if float((got - expected).norm() / expected.norm()) > 1e-3:
        # folding changed the float layer's function: this architecture's norms or wiring are not the
        # Llama ones the groups assume. Quantize it unscaled rather than wrongly.
        layer.load_state_dict(before)
        inputs_scale = {n: torch.ones(m.in_features) for n, m in found.items()}
        print(f"warning: AWQ scaling does not preserve {type(layer).__name__}; its layers are rounded unscaled",
              file=sys.stderr)
    packed = {}
    for n, lin in found.items():
        w = lin.weight.float()
        if clip and not n.endswith(("q_proj", "k_proj")):       # q/k errors are amplified by the softmax: not clipped
            w = math.clip_search(w, _sample(x[n], SEARCH_TOKENS // 2) / inputs_scale[n], spec.bits, spec.group_size,
                                    steps=CLIP_STEPS)
        codes, scale, zero = math.rtn(w, spec.bits, spec.group_size, sym=spec.sym, scale_dtype=spec.scale_dtype)
        packed[n] = wna16.packed_of(codes, scale, zero)
        wna16.set_weight(lin, packed[n])
    return packed


def _out(y) -> torch.Tensor:
    return (y[0] if isinstance(y, tuple) else y).float()


def _groups(modules: dict, found: dict) -> list[tuple[str, list[str]]]:
    """(producer, the Linears reading its output) for the groups this layer has (Llama-style names)."""
    def have(*names):
        return all(n in modules for n in names)

    groups = []
    if have("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        groups.append(("input_layernorm", ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]))
    if have("self_attn.v_proj", "self_attn.o_proj") and \
            found["self_attn.v_proj"].out_features == found["self_attn.o_proj"].in_features:
        groups.append(("self_attn.v_proj", ["self_attn.o_proj"]))
    if have("input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj") and \
            not have("pre_feedforward_layernorm"):             # pre-norm wiring: this norm feeds the MLP
        groups.append(("post_attention_layernorm", ["mlp.gate_proj", "mlp.up_proj"]))
    if have("mlp.up_proj", "mlp.down_proj"):
        groups.append(("mlp.up_proj", ["mlp.down_proj"]))
    return groups
