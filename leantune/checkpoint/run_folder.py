"""The run folder: the one place that knows its layout.

`leantune train` writes `output_dir/` as
  config.yaml              the resolved run config
  adapter/                 the final adapter (PEFT's format), or
  model/                   the whole model after full or freeze tuning
  checkpoints/step-N/      resumable checkpoints (`train/state.py` writes what is inside)

`find_model_and_adapter` turns what a user points at into (base model, adapter folder): a run folder
(its `adapter/`, its `model/`, or its newest checkpoint while a run is unfinished), an adapter folder
(its adapter_config.json names the base), or a plain model. `run_config` and `run_quant` read back the
run a folder belongs to.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from .. import adapters  # noqa: F401  (registers every method's config section, which load() reads)
from ..config import QuantConfig, RunConfig, load
from ..errors import ModelError
from ..adapters.format import read_config

CKPT_RE = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def find_model_and_adapter(source: str, base: str | None = None) -> tuple[str, Path | None]:
    """(base model, adapter folder or None) for a run folder, an adapter folder or a plain model; `base`
    overrides the base the adapter names."""
    p = Path(source)
    if p.is_dir() and (p / "config.yaml").exists() and not (p / "config.json").exists():  # a run folder
        if (p / "model").is_dir():  # method full/freeze: the run's output is a whole model
            return str(p / "model"), None
        if (p / "adapter").is_dir():
            p = p / "adapter"
        elif ckpts := checkpoint_dirs(p):
            if not (ckpts[-1] / "adapter_config.json").exists():
                raise ModelError(f"run folder {p} has no final model yet: full and freeze runs write one at the end; "
                                 f"resume it with `leantune train {p / 'config.yaml'} --resume`")
            print(f"note: {p} has no final adapter yet; using its newest checkpoint {ckpts[-1].name}", file=sys.stderr)
            p = ckpts[-1]
        else:
            raise ModelError(f"run folder {p} has no adapter and no checkpoint yet; train it first")
    if p.is_dir() and (p / "adapter_config.json").exists():
        model = base or read_config(p).get("base_model_name_or_path")
        if not model:
            raise ModelError(f"{p}/adapter_config.json names no base model; pass --base MODEL")
        return model, p
    return base or source, None


def run_quant(source: str, bits: int | None = None) -> QuantConfig | None:
    """The `quant` section to load the base with: `bits` when given, else that of the run the source
    belongs to (a run folder, or its adapter/ or checkpoint folder), else none."""
    if bits is not None:
        return QuantConfig(bits=bits)
    cfg = run_config(source)
    return cfg.quant if cfg is not None else None


def run_config(source: str | os.PathLike) -> RunConfig | None:
    """The config of the run `source` belongs to (its folder, or one of three parents), if any."""
    p = Path(source).resolve()
    for folder in (p, *p.parents[:3]):
        if (folder / "config.yaml").is_file() and not (folder / "config.json").exists():
            return load(folder / "config.yaml", validate=False)
    return None
