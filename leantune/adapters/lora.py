"""LoRA: Low-Rank Adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685).

    y = base(x) + s * B(A(dropout(x)))      A: (r, in), B: (out, r), s = alpha / r

rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732) scales by s = alpha / sqrt(r), which keeps
the update's size steady as r grows. Init is PEFT's default: A ~ kaiming-uniform(a=sqrt(5)), B = 0, so
the adapted model starts as the base ("gaussian": A ~ N(0, (1/r)^2)). Merging folds the update in:
W <- W + s * B @ A. LoRA+ (Hayou et al. 2024, https://arxiv.org/abs/2402.12354) trains B at lr_ratio
times A's learning rate.

This is PEFT's lora.Linear (peft/tuners/lora/layer.py) for a single adapter: the same random draws in
the same order, fp32 A and B over a bf16/fp16 base, and over an fp32 base the same forward arithmetic.
Over a bf16/fp16 base the update runs in the activations' dtype, not PEFT's fp32 (which upcasts every
activation and runs the LoRA GEMMs on the slow fp32 path of a GPU): A and B are cast per call, each
product's output is rounded once to bf16 (fp32 accumulation inside the GEMM), as under autocast. The
logits then agree with PEFT's to bf16 resolution (tests/parity), no longer bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..ops.lora import lora_linear, low_precision
from .base import Adapter, adapter_dtype, adapter_modules, find_targets, float_dtype, layer_features, require_linear, set_module, trainable_parameters

INITS = ("default", "gaussian", "loftq")  # loftq: drawn as default, then set by train/loftq.py


def lora_scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The weight update s * B @ A in fp32: (out, r) @ (r, in) -> (out, in)."""
    return (b.float() @ a.float()) * scaling


def _new_factors(in_features: int, out_features: int, rank: int, init: str,
                 base_dtype: torch.dtype | None) -> tuple[nn.Linear, nn.Linear]:
    """A and B, drawn from the global CPU generator exactly as PEFT's update_layer draws them."""
    dtype = adapter_dtype(base_dtype)
    # Both constructors draw nn.Linear's own init, which is then overwritten: wasted draws, but PEFT makes
    # them, and skipping them would shift every later draw (A of the next layer, dropout masks, data order).
    # Built on the CPU and moved afterwards, like PEFT, so a seed means the same A on every device.
    a = nn.Linear(in_features, rank, bias=False, dtype=dtype)
    b = nn.Linear(rank, out_features, bias=False, dtype=dtype)
    with torch.no_grad():
        if init in ("default", "loftq"):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(a.weight, std=1 / rank)
        nn.init.zeros_(b.weight)
        if base_dtype in (torch.float16, torch.bfloat16):
            # PEFT first moves new factors to the base dtype and only then upcasts them to fp32, so over a
            # bf16 base its A carries bf16 rounding. Round the same way: one seed, one adapter.
            a.weight.copy_(a.weight.to(base_dtype))
    return a, b


class LoraLinear(Adapter, method="lora"):
    """LoRA around one nn.Linear; A and B are `nn.Linear(bias=False)` in fp32 (fp64 over an fp64 base)."""

    config_section = "lora"

    @classmethod
    def attach(cls, model: nn.Module, section, tokenizer=None) -> list[str]:
        return _inject(cls, model, section.rank, section.alpha, section.dropout, section.targets,
                       section.rslora, section.init)

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False, init: str = "default") -> None:
        super().__init__(base_layer)
        self.rank, self.alpha, self.rslora, self.init = rank, alpha, rslora, init
        self.scaling = lora_scaling(rank, alpha, rslora)
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        in_features, out_features = layer_features(base_layer)
        self.lora_A, self.lora_B = _new_factors(in_features, out_features, rank, init, float_dtype(base_layer))
        device = base_layer.weight.device
        if device.type != "meta":
            self.lora_A.to(device)
            self.lora_B.to(device)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.lora_A.weight, self.lora_B.weight]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable(x):
            x_lora = None if isinstance(self.dropout, nn.Identity) or not self.training else self.dropout(x)
            return lora_linear(x, self.base_layer.weight, self.base_layer.bias, self.lora_A.weight,
                               self.lora_B.weight, self.scaling, x_lora)
        result = self.base_layer(x)
        if self.merged:
            return result
        if low_precision(x.dtype) and not torch.is_autocast_enabled(x.device.type):
            return self._update_in(x.dtype, x, result)
        out_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        # PEFT's order of operations: the sum is formed in fp32 (type promotion) and rounded once.
        result = result + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling
        return result.to(out_dtype)

    def _update_in(self, dtype: torch.dtype, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + s * B(A(dropout(x))) with bf16/fp16 activations (over a quantized base, say): the fp32
        masters are cast to `dtype` per call and the update is one GEMM accumulated into the base's output,
        as autocast would run PEFT's layer, so no product over activations runs in fp32."""
        a, b = self.lora_A.weight.to(dtype), self.lora_B.weight.to(dtype)
        xa = self.dropout(x).reshape(-1, x.shape[-1]) @ a.t()                   # (N, r)
        out = torch.addmm(result.reshape(-1, result.shape[-1]).to(dtype), xa, b.t(), alpha=self.scaling)
        return out.view(*result.shape[:-1], -1)                                 # (..., out)

    def _fusable(self, x: torch.Tensor) -> bool:
        # One autograd node (ops/lora.py) when the base is a plain frozen Linear in the activations' dtype;
        # fp32 A and B over a bf16 base are cast per call inside it. Anything else (a quantized or trainable
        # base, autocast) takes the module-by-module path.
        base = self.base_layer
        return (not self.merged and type(base) is nn.Linear and not base.weight.requires_grad
                and x.dtype == base.weight.dtype and not torch.is_autocast_enabled(x.device.type))

    def delta_weight(self) -> torch.Tensor:
        return lora_delta(self.lora_A.weight, self.lora_B.weight, self.scaling)

    def _base_weight(self) -> torch.Tensor:
        if float_dtype(self.base_layer) is None:
            raise ModelError(f"cannot merge LoRA into a quantized base layer ({type(self.base_layer).__name__}: its "
                             "weight is packed integers, and adding to it would corrupt it); load the base without "
                             "quant.bits (bf16/fp32) to merge, or keep the adapter unmerged")
        return self.base_layer.weight

    @torch.no_grad()
    def merge(self) -> None:
        """W += s * B @ A in place. The fp32 delta is added with one rounding to the base dtype."""
        if not self.merged:
            self._base_weight().add_(self.delta_weight())
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._base_weight().sub_(self.delta_weight())
            self.merged = False

    def extra_repr(self) -> str:
        scale = f"alpha/sqrt(r)={self.scaling:g}" if self.rslora else f"alpha/r={self.scaling:g}"
        return f"rank={self.rank}, {scale}, merged={self.merged}"


def check_hparams(rank: int, alpha: float, dropout: float, init: str) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ConfigError(f"lora.rank must be a positive integer, got {rank!r}; typical values are 8-64")
    if not alpha > 0:
        raise ConfigError(f"lora.alpha must be > 0, got {alpha!r}; a common choice is 2 * rank")
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {dropout!r}")
    if init == "zeros":
        raise ConfigError("lora.init zeros would start A and B both at zero, where neither ever gets a gradient; "
                          "use default (A kaiming-uniform, B zero) or gaussian")
    if init not in INITS:
        raise ConfigError(f"lora.init must be one of {', '.join(INITS)}, got {init!r}")


def inject_lora(model: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                targets: str | Sequence[str] = "all-linear", rslora: bool = False, init: str = "default") -> list[str]:
    """Wrap every target Linear of `model` in a LoraLinear; return the adapted paths in module order.

    Works on any torch model. Nothing is changed unless every target can be adapted. Trainability is
    left alone: call `mark_only_adapters_trainable(model)` to train the adapters only.
    """
    return _inject(LoraLinear, model, rank, alpha, dropout, targets, rslora, init)


def _inject(cls: type[LoraLinear], model: nn.Module, rank: int, alpha: float, dropout: float,
            targets: str | Sequence[str], rslora: bool, init: str) -> list[str]:
    check_hparams(rank, alpha, dropout, init)
    paths = find_targets(model, targets)
    require_linear(model, paths, cls.method)
    for path in paths:  # module order, as PEFT: the random draws line up with get_peft_model's
        set_module(model, path, cls(model.get_submodule(path), rank, alpha, dropout, rslora, init))
    return paths


def loraplus_param_groups(model: nn.Module, lr: float, lr_ratio: float, weight_decay: float = 0.0) -> list[dict]:
    """LoRA+ optimizer groups, the four PEFT's create_loraplus_optimizer builds, in its order.

    A (and any other trainable matrix) at lr; embedding adapters at 1e-6 (none here: the group stays
    empty); B at lr * lr_ratio with weight decay; B-rate without decay for 1-d parameters in a LayerNorm or
    named bias. Other trainable 1-d parameters go with B, as in PEFT. Empty groups are kept so that the
    optimizer's state_dict has PEFT's layout. `weight_decay` is PEFT's `loraplus_weight_decay`.
    """
    lora = [m for m in adapter_modules(model).values() if isinstance(m, LoraLinear)]
    a_ids = {id(m.lora_A.weight) for m in lora}
    b_ids = {id(m.lora_B.weight) for m in lora}
    no_decay_ids = {id(p) for m in model.modules() for name, p in m.named_parameters(recurse=False)
                    if isinstance(m, nn.LayerNorm) or name == "bias"}
    groups = {"lora_A": [], "embedding": [], "lora_B": [], "lora_B_no_decay": []}
    for _, p in trainable_parameters(model):
        if id(p) in a_ids:
            groups["lora_A"].append(p)
        elif id(p) in b_ids or p.ndim == 1:
            groups["lora_B_no_decay" if id(p) in no_decay_ids else "lora_B"].append(p)
        else:
            groups["lora_A"].append(p)
    if not groups["lora_A"] and not groups["lora_B"]:
        raise ModelError("no trainable LoRA parameters for LoRA+; inject_lora and mark_only_adapters_trainable first")
    settings = {"lora_A": (lr, weight_decay), "embedding": (1e-6, weight_decay),
                "lora_B": (lr * lr_ratio, weight_decay), "lora_B_no_decay": (lr * lr_ratio, 0.0)}
    return [{"params": groups[name], "lr": settings[name][0], "weight_decay": settings[name][1], "name": name}
            for name in groups]
