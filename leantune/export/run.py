"""`leantune export`: from what the user points at (run folder, adapter folder, HF folder, .gguf) to a file
in one of the registered formats (`export/base.py`; GGUF today), through the one merge path.

Order of work, the same for every format: resolve the source and let the format refuse it (an
unsupported architecture fails before anything is loaded); refuse an output that exists (unless
--overwrite); then materialize the merged model (`infer/materialize.py`: any mergeable method, the
QLoRA base decided once and printed, the run's chat template on the tokenizer) and hand it to the
exporter, which writes the file and its report.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..checkpoint.run_folder import is_run_folder
from ..errors import ConfigError, ModelError
from ..infer.materialize import BaseChoice, Located, check_mergeable, locate, materialize
from ..io.outputs import check_output_file
from ..models.gguf_import import gguf_to_hf
from .base import ExportOptions, get


def local_folder(found: Located) -> Path:
    """The HF model folder to export from: the base itself, or the HF folder of a .gguf base."""
    model = str(found.base_model)
    if model.endswith(".gguf"):
        return gguf_to_hf(model)
    folder = Path(model).expanduser()
    if not folder.is_dir():
        raise ModelError(f"export needs a local model: {model!r} is not a folder or .gguf file "
                         f"(download it first, or pass --base ./local-folder)")
    return folder


def default_out(source: str, name: str) -> Path:
    """Beside the run for a run folder, else in the working folder."""
    src = Path(source)
    return (src if is_run_folder(src) else Path.cwd()) / name


def export(source: str, *, format: str = "gguf", quant: str | None = None, out: str | None = None,
           base_model: str | None = None, merge_base: BaseChoice = "dequantized", adapter_only: bool = False,
           overwrite: bool = False, options: ExportOptions | None = None) -> dict:
    """Write `source` as `format` (see the module docstring); return the exporter's report."""
    exporter = get(format)
    quant = exporter.check_quant(quant)
    options = options or ExportOptions()
    found = locate(source, base_model)
    folder = local_folder(found)
    exporter.check_source(folder)
    if adapter_only and not exporter.writes_adapter:
        raise ConfigError(f"--adapter-only is not available for --format {format}; drop it to export the merged model")
    if adapter_only and found.adapter is None:
        raise ModelError(f"{source} has no adapter; --adapter-only needs a run folder or an adapter folder")
    if not adapter_only:
        check_mergeable(found)
    stem = Path(source).resolve().name or "model"
    path = Path(out) if out else default_out(source, exporter.default_name(stem, quant, adapter_only))
    check_output_file(path, overwrite=overwrite)
    if options.modelfile:
        check_output_file(path.with_name("Modelfile"), overwrite=overwrite, flag="the Modelfile beside --out")
    options.name = options.name or stem
    model, tok, facts = materialize(source, base=merge_base, found=found, merge=not adapter_only)
    if not adapter_only:
        print(f"exporting: {facts.describe()}", file=sys.stderr)
        return exporter.write(model, tok, facts, folder, path, quant, options)
    return exporter.write_adapter(model, tok, facts, folder, path, options)
