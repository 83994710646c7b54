"""Combine several LoRA adapters into one, module by module, with a method of `merge.methods`.

Input: adapter folders (PEFT format). Output: {module path: (A, B)} at one rank, with scaling 1
(lora_alpha = r), written as a PEFT adapter by `write_adapter`. The methods are those of PEFT's
`add_weighted_adapter`, with the same arithmetic:

    cat                      exact: ranks add, B @ A = sum_i w_i s_i B_i A_i
    svd                      the exact weighted sum of deltas, re-factorised to `rank` (default: the largest rank)
    linear, ties, dare_linear, dare_ties, magnitude_prune
                             factor by factor (A's together, B's together) -- needs equal ranks; adapters of
                             different ranks go through the delta-space variant (`<method>_svd`) instead
    ties_svd, dare_*_svd, magnitude_prune_svd
                             the method applied to the deltas s_i B_i A_i, then SVD to `rank`

A module only some adapters adapt is combined from those that do (PEFT does the same). DARE's masks
are drawn from a generator seeded with `seed`, module by module in model order (`order`), A's before
B's: the draws PEFT makes from the global generator at the same point.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..adapters.lora import lora_delta, lora_scaling
from ..io.atomic import atomic_dir, save_safetensors, write_json
from ..io.outputs import write_manifest
from ..checkpoint.peft_format import CONFIG_NAME, PEFT_LORA_DEFAULTS, PREFIX, WEIGHTS_NAME, read_lora
from ..errors import ConfigError, ModelError
from . import methods as M

FACTOR_METHODS = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_METHODS = ("svd",) + tuple(f"{m}_svd" for m in FACTOR_METHODS if m != "linear")
METHODS = ("cat",) + FACTOR_METHODS + SVD_METHODS


@dataclass
class LoraWeights:
    """One LoRA adapter read from disk: its config and {module path: (A (r, in), B (out, r))}."""

    where: Path
    config: dict
    factors: dict[str, tuple[Tensor, Tensor]]

    @property
    def rank(self) -> int:
        return int(self.config["r"])

    @property
    def scaling(self) -> float:
        return lora_scaling(self.rank, self.config["lora_alpha"], bool(self.config.get("use_rslora", False)))

    @property
    def base(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def delta(self, path: str) -> Tensor:
        a, b = self.factors[path]
        return lora_delta(a, b, self.scaling)


def read_adapter(folder: str | os.PathLike) -> LoraWeights:
    config, by_module = read_lora(folder)
    if config.get("use_dora"):  # W' = m (W + sBA) / ||W + sBA||: not a delta that adds or streams
        raise ModelError(f"{str(folder)!r} is a DoRA adapter; recipes combine plain LoRA only "
                         "(`leantune merge RUN --out DIR` folds one DoRA adapter into its base)")
    factors = {p: (f["lora_A"].float(), f["lora_B"].float()) for p, f in by_module.items()}
    return LoraWeights(Path(folder), config, factors)


def natural_order(paths: Sequence[str]) -> list[str]:
    """Module paths in model order when the model is not at hand: layer numbers compare as numbers."""
    return sorted(paths, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)])


# ---------------------------------------------------------------------------------------------
# Checks: all before anything is computed or written


def _same_base(adapters: Sequence[LoraWeights]) -> None:
    def norm(base: str) -> str:
        return str(Path(base).resolve()) if Path(base).exists() else base

    named = {norm(a.base): a for a in adapters if a.base}
    if len(named) > 1:
        (b1, a1), (b2, a2) = list(named.items())[:2]
        raise ModelError(f"{a1.where} was trained on {b1} but {a2.where} on {b2}; merge only adapters of one base "
                         f"(or fix base_model_name_or_path in {CONFIG_NAME} if both are the same model)")


def _same_shapes(adapters: Sequence[LoraWeights]) -> None:
    seen: dict[str, tuple[tuple[int, int], Path]] = {}
    for ad in adapters:
        for path, (a, b) in ad.factors.items():
            shape = (b.shape[0], a.shape[1])  # (out, in) of the adapted layer
            known = seen.setdefault(path, (shape, ad.where))
            if known[0] != shape:
                raise ModelError(f"{path} is {known[0][0]}x{known[0][1]} in {known[1]} but {shape[0]}x{shape[1]} in "
                                 f"{ad.where}: the adapters were trained for different bases; merge adapters of one base")


def check_request(adapters: Sequence[LoraWeights], weights: Sequence[float], method: str,
                  density: float | None, rank: int | None) -> None:
    if not isinstance(method, str) or method not in METHODS:
        import difflib

        close = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown merge method {method!r}{hint}; use one of {', '.join(METHODS)}")
    if not adapters:
        raise ConfigError("no adapters to merge; list at least one adapter folder")
    if len(weights) != len(adapters):
        raise ConfigError(f"{len(weights)} weights for {len(adapters)} adapters; give one weight per adapter "
                          "(negative to subtract one)")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights):
        raise ConfigError(f"weights must be numbers, got {list(weights)!r}")
    needs_density = method.removesuffix("_svd") in M.DENSITY_METHODS
    if needs_density and (not isinstance(density, (int, float)) or isinstance(density, bool) or not 0 < density <= 1):
        raise ConfigError(f"method {method} needs a density in (0, 1] (the fraction of entries kept), got {density!r}")
    if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
        raise ConfigError(f"rank must be a positive integer (the rank of the merged adapter), got {rank!r}")
    _same_base(adapters)
    _same_shapes(adapters)


# ---------------------------------------------------------------------------------------------
# Combining


def effective_method(adapters: Sequence[LoraWeights], method: str) -> str:
    """`method`, or its delta-space SVD variant when factor-by-factor combination cannot work (ranks differ)."""
    if method in FACTOR_METHODS and len({a.rank for a in adapters}) > 1:
        return "svd" if method == "linear" else f"{method}_svd"
    return method


def new_rank(adapters: Sequence[LoraWeights], method: str, rank: int | None) -> int:
    if method == "cat":
        return sum(a.rank for a in adapters)
    if method in SVD_METHODS:
        return rank or max(a.rank for a in adapters)
    return adapters[0].rank


def combine(adapters: Sequence[LoraWeights], weights: Sequence[float], method: str, *, density: float | None = None,
            rank: int | None = None, seed: int = 0, order: Sequence[str] | None = None
            ) -> tuple[dict[str, tuple[Tensor, Tensor]], int, str]:
    """({module path: (A, B)} with scaling 1, its rank, the method used). See the module docstring."""
    check_request(adapters, weights, method, density, rank)
    used = effective_method(adapters, method)
    r = new_rank(adapters, used, rank)
    paths = {p for a in adapters for p in a.factors}
    order = [p for p in order if p in paths] if order is not None else natural_order(paths)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for path in order:
        present = [(a, w) for a, w in zip(adapters, weights) if path in a.factors]
        out[path] = M.pad_rank(*_combine_module(path, present, used, density or 1.0, r, generator), r)
    return out, r, used


def _combine_module(path: str, present: list[tuple[LoraWeights, float]], method: str, density: float, rank: int,
                    generator: torch.Generator) -> tuple[Tensor, Tensor]:
    weights = [w for _, w in present]
    scalings = [a.scaling for a, _ in present]
    if method == "cat":
        return M.concat_factors([a.factors[path][0] for a, _ in present], [a.factors[path][1] for a, _ in present],
                                weights, scalings)
    if method in FACTOR_METHODS:
        return M.combine_factors(method, [a.factors[path][0] for a, _ in present],
                                 [a.factors[path][1] for a, _ in present], weights, scalings, density, generator)
    tensor_method = "linear" if method == "svd" else method.removesuffix("_svd")
    delta = M.TENSOR_METHODS[tensor_method]([a.delta(path) for a, _ in present], weights, density, generator)
    return M.svd_factors(delta, rank)


# ---------------------------------------------------------------------------------------------
# Writing


def adapter_config(adapters: Sequence[LoraWeights], rank: int, paths: Sequence[str]) -> dict:
    """The PEFT config of a combined adapter: rank r, lora_alpha r (scaling 1), the union of targets."""
    config = dict(PEFT_LORA_DEFAULTS)
    config.update(base_model_name_or_path=next((a.base for a in adapters if a.base), None), r=rank, lora_alpha=rank,
                  use_rslora=False, target_modules=sorted({p.rsplit(".", 1)[-1] for p in paths}))
    return config


def write_adapter(out_dir: str | os.PathLike, factors: dict[str, tuple[Tensor, Tensor]], config: dict) -> Path:
    """Write a PEFT LoRA folder atomically: it appears complete or not at all."""
    tensors = {}
    for path, (a, b) in factors.items():
        tensors[f"{PREFIX}{path}.lora_A.weight"] = a.contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = b.contiguous()
    with atomic_dir(out_dir) as tmp:
        save_safetensors(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
        write_json(tmp / CONFIG_NAME, config)
        write_manifest(tmp)
    return Path(out_dir)
