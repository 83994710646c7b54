"""The run folder: the one place that knows its layout, and the sidecar that travels with each adapter.

`leantune train` writes `output_dir/` as
  config.yaml              the resolved run config (train it again with `leantune train config.yaml`)
  data_report.json         what the data pipeline read, kept, skipped and why
  metrics.jsonl            one line per logged step; tensorboard/ the same for TensorBoard; loss.svg the curves
  checkpoints/step-N/      resumable checkpoints (`train/state.py` writes what is inside)
  adapter/                 the final adapter (PEFT's format), or
  model/                   the whole model after full or freeze tuning
  summary.json             written last: the run finished
  leantune.lock            while a run is training in it: the pid that owns the folder (io/lock.py)

Beside every adapter (and in `model/`) the trainer writes `leantune.json`, the facts a consumer needs to
use it as it was trained: the method, the base as the run named it, the dtype, the `quant` section, the
chat template and system prompt, trust_remote_code. `generate`, `merge`, `export` and `demo` read that
instead of re-parsing the run's config.yaml, so an adapter folder copied elsewhere keeps them. A folder
written before the sidecar existed falls back to its run's config.yaml, found by the layout above.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .. import adapters  # noqa: F401  (registers every method's config section, which load() reads)
from ..adapters.format import CONFIG_NAME, read_config
from ..config import QuantConfig, RunConfig, load
from ..errors import ModelError
from ..io.atomic import write_json

CONFIG = "config.yaml"
DATA_REPORT = "data_report.json"
METRICS = "metrics.jsonl"
LOSS_SVG = "loss.svg"
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
MODEL = "model"
SUMMARY = "summary.json"
SIDECAR = "leantune.json"
LOCK = "leantune.lock"
CKPT_RE = re.compile(r"^step-(\d+)$")
SIDECAR_VERSION = 1


@dataclass(frozen=True)
class RunFolder:
    """Paths inside one run folder. Nothing is read or created by building one."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    config = property(lambda self: self.path / CONFIG)
    data_report = property(lambda self: self.path / DATA_REPORT)
    metrics = property(lambda self: self.path / METRICS)
    loss_svg = property(lambda self: self.path / LOSS_SVG)
    tensorboard = property(lambda self: self.path / TENSORBOARD)
    adapter = property(lambda self: self.path / ADAPTER)
    model = property(lambda self: self.path / MODEL)
    summary = property(lambda self: self.path / SUMMARY)
    lock = property(lambda self: self.path / LOCK)

    def output(self, whole_model: bool) -> Path:
        """Where the run's result goes: model/ after full or freeze tuning, else adapter/."""
        return self.model if whole_model else self.adapter

    def checkpoint(self, step: int) -> Path:
        return self.path / CHECKPOINTS / f"step-{step:06d}"

    def checkpoints(self) -> list[Path]:
        """The run's checkpoint folders, oldest first."""
        return checkpoint_dirs(self.path)


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """The checkpoint folders of the run at `run_dir`, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CKPT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def is_run_folder(path: str | os.PathLike) -> bool:
    """A folder `leantune train` wrote: config.yaml, and not an HF model folder (config.json)."""
    p = Path(path)
    return p.is_dir() and (p / CONFIG).is_file() and not (p / "config.json").exists()


def run_folder_of(path: str | os.PathLike) -> RunFolder | None:
    """The run `path` is, or belongs to by the layout (its adapter/, model/ or checkpoints/step-N/), if any."""
    p = Path(path).resolve()
    candidates = [p]
    if p.name in (ADAPTER, MODEL):
        candidates.append(p.parent)
    if CKPT_RE.match(p.name) and p.parent.name == CHECKPOINTS:
        candidates.append(p.parent.parent)
    return next((RunFolder(c) for c in candidates if is_run_folder(c)), None)


# ---------------------------------------------------------------------------------------------
# The sidecar


@dataclass(frozen=True)
class RunInfo:
    """What an adapter (or a full/freeze model) was trained with, as written into `leantune.json`."""

    method: str
    base_model: str                      # the base as the run named it (a folder, hub id or .gguf)
    dtype: str = "auto"                  # the run's dtype setting (auto | bf16 | fp32 | fp16)
    quant: dict | None = None            # the run's quant section when the base was quantized, else None
    chat_template: str | None = None     # the template the run trained with when it set data.chat_template
    system_prompt: str | None = None     # data.system_prompt
    trust_remote_code: bool = False

    @classmethod
    def of(cls, cfg: RunConfig, chat_template: str | None = None) -> RunInfo:
        """The sidecar of a run; `chat_template` is the run's data.chat_template resolved to its text."""
        return cls(method=cfg.method, base_model=cfg.model, dtype=cfg.dtype,
                   quant=dataclasses.asdict(cfg.quant) if cfg.quant.bits else None,
                   chat_template=chat_template, system_prompt=cfg.data.system_prompt,
                   trust_remote_code=cfg.trust_remote_code)

    def quant_config(self) -> QuantConfig | None:
        if not self.quant:
            return None
        known = {f.name for f in dataclasses.fields(QuantConfig)}
        return QuantConfig(**{k: v for k, v in self.quant.items() if k in known})


def write_run_info(folder: str | os.PathLike, info: RunInfo) -> Path:
    path = Path(folder) / SIDECAR
    write_json(path, {"leantune_sidecar": SIDECAR_VERSION, **dataclasses.asdict(info)})
    return path


def read_run_info(folder: str | os.PathLike) -> RunInfo | None:
    """The sidecar in `folder`; else, for a folder of a run written before sidecars, the facts of its
    config.yaml; else None (an adapter from elsewhere, or a plain model)."""
    path = Path(folder) / SIDECAR
    if path.is_file():
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelError(f"{path} is not valid JSON ({e}); delete it, or copy it again from the run") from None
        fields = {f.name for f in dataclasses.fields(RunInfo)}
        return RunInfo(**{k: v for k, v in raw.items() if k in fields})
    run = run_folder_of(folder)
    if run is None:
        return None
    cfg = load(run.config, validate=False)
    return RunInfo.of(cfg, chat_template=cfg.data.chat_template)


# ---------------------------------------------------------------------------------------------
# What a user points at


def find_model_and_adapter(source: str, base: str | None = None) -> tuple[str, Path | None]:
    """(base model, adapter folder or None) for a run folder, an adapter folder or a plain model; `base`
    overrides the base the adapter names."""
    p = Path(source)
    if is_run_folder(p):
        run = RunFolder(p)
        if run.model.is_dir():  # method full/freeze: the run's output is a whole model
            return str(run.model), None
        if run.adapter.is_dir():
            p = run.adapter
        elif ckpts := run.checkpoints():
            if not (ckpts[-1] / CONFIG_NAME).exists():
                raise ModelError(f"run folder {p} has no final model yet: full and freeze runs write one at the end; "
                                 f"resume it with `leantune train {run.config} --resume`")
            print(f"note: {p} has no final adapter yet; using its newest checkpoint {ckpts[-1].name}", file=sys.stderr)
            p = ckpts[-1]
        else:
            raise ModelError(f"run folder {p} has no adapter and no checkpoint yet; train it first")
    if p.is_dir() and (p / CONFIG_NAME).exists():
        model = base or read_config(p).get("base_model_name_or_path")
        if not model:
            raise ModelError(f"{p / CONFIG_NAME} names no base model; pass --base MODEL")
        return model, p
    return base or source, None


def run_info(source: str | os.PathLike) -> RunInfo | None:
    """The sidecar of what `source` resolves to (a run folder's adapter, model or newest checkpoint; an
    adapter or checkpoint folder), or None when it carries none (an adapter from elsewhere, a plain model)."""
    p = Path(source)
    if not p.is_dir():
        return None
    if is_run_folder(p):
        run = RunFolder(p)
        ckpts = run.checkpoints()
        p = next((d for d in (run.model, run.adapter) if d.is_dir()), ckpts[-1] if ckpts else p)
    return read_run_info(p)


def run_quant(source: str, bits: int | None = None) -> QuantConfig | None:
    """The `quant` section to load the base with: `bits` when given, else that of the run the source
    belongs to (a run folder, or its adapter/ or checkpoint folder), else none."""
    if bits is not None:
        return QuantConfig(bits=bits)
    info = run_info(source)
    return info.quant_config() if info is not None else None


def run_config(source: str | os.PathLike) -> RunConfig | None:
    """The whole config of the run `source` is or belongs to (by the layout), if any."""
    run = run_folder_of(source)
    return load(run.config, validate=False) if run is not None else None
