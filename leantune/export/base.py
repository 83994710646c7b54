"""The exporter interface and registry: one class per output format, registered by subclassing.

    class GGUFExporter(Exporter, format="gguf"): ...    # EXPORTERS["gguf"]; `leantune export --format gguf`

An exporter declares its quant types (`quants`, `default_quant`), its file suffix and whether it can write
an adapter alone, and implements `write` (and `write_adapter`): it receives the merged model from the one
merge path (`infer/materialize.py`), never loads anything itself, and leaves it as it found it (the same
model is then scored against the artifact, and `--all` hands it to every format in turn). `load_back`
reads the written artifact back as a float32 torch model, which the common fidelity report
(`export/fidelity.py`) scores against the model. `export/run.py` does the rest for every format:
resolving the source, refusing an output it must not overwrite, materializing, timing, reporting.

The built-in exporters are the packages of this folder (`export/gguf/`); they are found by name without
being imported (`leantune --help` stays fast) and imported when asked for. An exporter defined anywhere
else registers as soon as its module is imported. This file imports nothing heavy.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import ConfigError

if TYPE_CHECKING:   # the annotation only: this file stays light
    import torch

EXPORTERS: dict[str, type[Exporter]] = {}

# --help text only (the CLI must not import an exporter to print its help): each built-in format's quant
# types, default first. tests/unit/test_exporters.py checks this table against the registered classes.
BUILTIN_QUANTS: dict[str, tuple[str, ...]] = {
    "gguf": ("Q4_K_M", "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q5_K_M", "Q6_K"),
    "int8": ("W8A16", "W8A8", "LLM_INT8"),
    "gptq": ("GPTQ_V1", "PACK_QUANTIZED"),
    "awq": ("GEMM", "PACK_QUANTIZED"),
}

# What `--all` writes beyond each format's default quant: the variants the issue names (GGUF's near-lossless
# Q8_0 beside its default Q4_K_M; every INT8 form). A quant a format does not (yet) have is left out.
ALL_QUANTS: dict[str, tuple[str, ...]] = {
    "gguf": ("Q8_0", "Q4_K_M"),
    "int8": ("W8A16", "W8A8", "LLM_INT8"),
}


@dataclass
class ExportOptions:
    """What the user asked for beyond format, quant and output path."""

    name: str = ""                        # the model's name inside the file
    modelfile: bool = False               # also write an Ollama Modelfile (formats that have one)
    evaluate: bool = True                 # score the written file against the source model
    texts: list[str] | None = None        # held-out text for that score (None: the exporter's own)
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)


class Exporter:
    """One output format. Subclasses register with `format="name"`."""

    format: ClassVar[str]
    quants: ClassVar[tuple[str, ...]] = ()      # accepted --quant values, upper case; () means none
    default_quant: ClassVar[str | None] = None
    suffix: ClassVar[str] = ""                  # the default output's extension, e.g. ".gguf"
    writes_folder: ClassVar[bool] = False       # the artifact is a folder (an HF model folder), not one file
    writes_adapter: ClassVar[bool] = False      # supports --adapter-only

    def __init_subclass__(cls, format: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if format is None:
            return
        known = EXPORTERS.get(format)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"export format {format!r} is already registered by {known.__qualname__}")
        cls.format = format
        EXPORTERS[format] = cls

    def check_quant(self, quant: str | None) -> str | None:
        if quant is None:
            return self.default_quant
        q = quant.upper()
        if q not in self.quants:
            choices = ", ".join(self.quants) if self.quants else "none (drop --quant)"
            raise ConfigError(f"--quant {quant!r} is not a {self.format} quant type; choose one of {choices}")
        return q

    def check_source(self, folder: Path) -> None:
        """Refuse a model this format cannot hold before anything is loaded (default: accept)."""

    def default_name(self, stem: str, quant: str | None, adapter_only: bool) -> str:
        return f"{stem}-{'adapter' if adapter_only else (quant or self.format)}{self.suffix}"

    def write(self, model, tokenizer, facts, folder: Path, out: Path, quant: str | None,
              options: ExportOptions) -> dict:
        """Write the merged `model` (its tokenizer carries the run's chat template) to `out`, atomically (a
        folder format: through `io.atomic.atomic_dir`); leave `model` unchanged. Return the format's own part
        of the report (e.g. GGUF's per-tensor errors); `stored_bytes`, when given, is the bytes of stored
        tensor data that bits/weight is computed from (default: the safetensors data in `out`, else its size)."""
        raise NotImplementedError

    def load_back(self, out: Path) -> torch.nn.Module | None:
        """The artifact at `out` loaded back, dequantized to a float32 model on the CPU, in eval mode: what the
        fidelity report scores against the model it came from. None (the default): the model-level scores
        are skipped, and the report says so."""
        return None

    def write_adapter(self, model, tokenizer, facts, folder: Path, out: Path, options: ExportOptions) -> dict:
        """Write the adapter attached to `model` alone (when `writes_adapter`)."""
        raise ConfigError(f"--adapter-only is not available for --format {self.format}")


def available() -> list[str]:
    """Every format: the registered ones and the built-in packages of this folder (found, not imported)."""
    here = Path(__file__).parent
    builtin = {m.name for m in pkgutil.iter_modules([str(here)]) if m.ispkg}
    return sorted(builtin | set(EXPORTERS))


def get(name: str) -> Exporter:
    """An instance of the exporter for `name`, importing the built-in package of that name when needed."""
    if name not in EXPORTERS and name in available():
        importlib.import_module(f"{__package__}.{name}")   # a built-in registers itself on import
    if name not in EXPORTERS:
        raise ConfigError(f"unknown export format {name!r}; choose one of {', '.join(available())}")
    return EXPORTERS[name]()


def all_help() -> str:
    """'awq GEMM, gguf Q8_0 and Q4_K_M, ...': what `--all` writes, for --help, without importing any exporter."""
    return ", ".join(f"{n} {' and '.join(ALL_QUANTS.get(n) or BUILTIN_QUANTS.get(n, ('(its default)',))[:1])}"
                     for n in available())


def quant_help() -> str:
    """'gguf: Q4_K_M (default), F32, ...' for every format, without importing any exporter."""
    table = dict(BUILTIN_QUANTS)
    for name, cls in EXPORTERS.items():
        table[name] = tuple(dict.fromkeys(([cls.default_quant] if cls.default_quant else []) + list(cls.quants)))
    parts = [f"{n}: {q[0]} (default), {', '.join(q[1:])}" if len(q) > 1 else f"{n}: {', '.join(q) or 'none'}"
             for n, q in sorted(table.items())]
    return "; ".join(parts)
