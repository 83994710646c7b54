"""`leantune merge recipe.yaml`: several adapters combined as a YAML recipe says.

    adapters: [runs/code/adapter, runs/chat/adapter]   # folders; relative paths are relative to this file
    weights: [1.0, -0.3]          # one per adapter; negative subtracts (task negation)
    method: ties                  # cat | linear | svd | ties | dare_linear | dare_ties | magnitude_prune (+ *_svd)
    density: 0.5                  # ties, dare_*, magnitude_prune: fraction of entries kept
    rank: 16                      # svd methods: rank of the result (default: the largest input rank)
    seed: 0                       # dare_*: the masks' seed
    output: adapter               # adapter (PEFT format) | model (folded into the base: an HF folder)
    out: merged/code-minus-chat   # or --out on the command line
    base: ./SmolLM2-135M          # the base model, when the adapters do not record it (output: model)

Every check (keys, method, weights, adapters, shapes, bases) runs before anything is written.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config import load_yaml
from ..errors import ConfigError, ModelError
from ..infer.materialize import run_tokenizer
from ..io.outputs import check_output_dir
from .combine import adapter_config, check_request, combine, read_adapter, write_adapter
from .fold import fold_into_base, model_folder, module_layout

OUTPUTS = ("adapter", "model")


@dataclass
class Recipe:
    adapters: list[str]
    weights: list[float] | None = None
    method: str = "cat"
    density: float | None = None
    rank: int | None = None
    seed: int = 0
    output: str = "adapter"
    out: str | None = None
    base: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def read_recipe(path: str | os.PathLike) -> Recipe:
    raw = load_yaml(path)
    known = [f.name for f in fields(Recipe) if f.name != "extra"]
    for key in raw:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise ConfigError(f"recipe {path}: unknown key {key!r}" + (f" (did you mean {close[0]}?)" if close else "")
                              + f"; the keys are {', '.join(known)}")
    adapters = raw.get("adapters")
    if not isinstance(adapters, list) or not adapters or not all(isinstance(a, str) for a in adapters):
        raise ConfigError(f"recipe {path}: adapters must be a list of adapter folders, e.g. adapters: [runs/a/adapter, "
                          "runs/b/adapter]")
    for key in ("base", "out", "method", "output"):  # paths and names: text (fuzzing found a dict base's TypeError)
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"recipe {path}: {key} must be text, got {type(raw[key]).__name__} {raw[key]!r:.60}")
    here = Path(path).resolve().parent
    recipe = Recipe(**{k: v for k, v in raw.items() if k in known})
    recipe.adapters = [str(_relative(a, here)) for a in adapters]
    if recipe.base and Path(_relative(recipe.base, here)).exists():
        recipe.base = str(_relative(recipe.base, here))
    if recipe.out:
        recipe.out = str(_relative(recipe.out, here))
    if recipe.weights is None:
        recipe.weights = [1.0] * len(adapters)
    if not isinstance(recipe.weights, list):
        raise ConfigError(f"recipe {path}: weights must be a list with one number per adapter, got {recipe.weights!r}")
    if recipe.output not in OUTPUTS:
        raise ConfigError(f"recipe {path}: output must be adapter or model, got {recipe.output!r}")
    if not isinstance(recipe.seed, int) or isinstance(recipe.seed, bool):
        raise ConfigError(f"recipe {path}: seed must be an integer, got {recipe.seed!r}")
    return recipe


def _relative(p: str, here: Path) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() else here / q


def run_recipe(path: str | os.PathLike, out: str | None = None, console=print, overwrite: bool = False) -> Path:
    """Combine the recipe's adapters and write the result (adapter or model) to `out` (or the recipe's `out`)."""
    recipe = read_recipe(path)
    target = out or recipe.out
    if not target:
        raise ConfigError(f"recipe {path} names no output folder: add out: DIR to it, or pass --out DIR")
    check_output_dir(target, overwrite=overwrite, sources=recipe.adapters)
    adapters = [read_adapter(a) for a in recipe.adapters]
    check_request(adapters, recipe.weights, recipe.method, recipe.density, recipe.rank)
    base = recipe.base or next((a.base for a in adapters if a.base), None)
    folder, order = _base_layout(base, required=recipe.output == "model")
    factors, rank, used = combine(adapters, recipe.weights, recipe.method, density=recipe.density, rank=recipe.rank,
                                  seed=recipe.seed, order=order)
    if used != recipe.method:
        console(f"note: the adapters' ranks differ ({', '.join(str(a.rank) for a in adapters)}), so {recipe.method} "
                f"combines their weight deltas and re-factorises by SVD ({used}, rank {rank})")
    if recipe.output == "adapter":
        config = adapter_config(adapters, rank, list(factors))
        if recipe.base:
            config["base_model_name_or_path"] = recipe.base
        written = write_adapter(target, factors, config)
    else:
        written = fold_into_base(folder, factors, 1.0, target, tokenizer=run_tokenizer(base, None))
    console(f"merged {len(adapters)} adapters ({used}, rank {rank}) into {written}")
    return written


def _base_layout(base: str | None, required: bool) -> tuple[Path | None, list[str] | None]:
    """(base folder, module order) -- the order DARE draws its masks in; None when the base is not at hand
    and only an adapter is written (then modules go in natural order)."""
    if base is None:
        if required:
            raise ConfigError("output: model needs the base model: add base: PATH to the recipe (the adapters "
                              "record none)")
        return None, None
    try:
        folder = model_folder(base)
    except ModelError:
        if required:
            raise
        return None, None
    return folder, module_layout(folder)[0]
