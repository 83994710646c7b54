"""`leantune export`: from what the user points at (run folder, adapter folder, HF folder, .gguf) to a
GGUF file, its fidelity report (<file>.fidelity.json) and optionally an Ollama Modelfile.

Order of work: resolve the source and check its architecture first (an unsupported model fails before
anything is loaded), then load in float32, merge the adapter in memory, write, and measure.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..adapters.base import unload
from ..checkpoint.peft_format import load_adapter
from ..checkpoint.run_folder import find_model_and_adapter, is_run_folder
from ..errors import ModelError
from ..io.atomic import write_json, write_text
from ..models.gguf_import import gguf_to_hf
from ..models.load import load_model, load_tokenizer
from . import fidelity
from .gguf import architecture, write_gguf
from .lora_gguf import write_lora_gguf
from .quant_mix import check_quant


def resolve(source: str, base: str | None = None) -> tuple[Path, Path | None]:
    """(HF model folder, adapter folder or None) for a run, adapter, HF folder or .gguf file."""
    model_src, adapter = find_model_and_adapter(source, base)
    if str(model_src).endswith(".gguf"):
        return gguf_to_hf(model_src), adapter
    folder = Path(model_src).expanduser()
    if not folder.is_dir():
        raise ModelError(f"export needs a local model: {model_src!r} is not a folder or .gguf file "
                         f"(download it first, or pass --base ./local-folder)")
    return folder, adapter


def default_out(source: str, quant: str, adapter_only: bool) -> Path:
    src = Path(source)
    stem = src.resolve().name or "model"
    suffix = "lora-F32" if adapter_only else quant
    return (src if is_run_folder(src) else Path.cwd()) / f"{stem}-{suffix}.gguf"


def _load(folder: Path, adapter: Path | None, merge: bool):
    model = load_model(str(folder), dtype="fp32", device="cpu").eval().requires_grad_(False)
    tok = load_tokenizer(str(folder))
    if adapter is not None:
        load_adapter(model, adapter)
        if merge:
            unload(model, merge=True)
    return model, tok


def export_gguf(source: str, *, quant: str = "Q4_K_M", out: str | None = None, base: str | None = None,
                adapter_only: bool = False, modelfile: bool = False, evaluate: bool = True,
                texts: list[str] | None = None, progress: bool = True) -> dict:
    quant = check_quant(quant)
    folder, adapter = resolve(source, base)
    arch = architecture(folder)
    if adapter_only and adapter is None:
        raise ModelError(f"{source} has no adapter; --adapter-only needs a run folder or an adapter folder")
    path = Path(out) if out else default_out(source, quant, adapter_only)
    t0 = time.perf_counter()
    model, tok = _load(folder, adapter, merge=not adapter_only)
    if adapter_only:
        count, alpha = write_lora_gguf(model, arch, path, Path(source).resolve().name)
        return {"file": str(path), "tensors": count, "alpha": alpha, "file_bytes": path.stat().st_size}
    records = write_gguf(model, tok, folder, path, quant, name=Path(source).resolve().name, progress=progress)
    seconds = time.perf_counter() - t0
    model_level = None
    if evaluate:
        back = fidelity.load_gguf_back(path)
        model_level = fidelity.compare_models(model, back, tok, texts or fidelity.DEFAULT_TEXTS)
    n_params = sum(p.numel() for p in model.parameters())
    report = fidelity.build_report(records, path, quant, n_params, model_level, seconds)
    write_json(path.with_name(path.name.removesuffix(".gguf") + ".fidelity.json"), report)
    if modelfile:
        write_text(path.with_name("Modelfile"), ollama_modelfile(path, tok))
    print(fidelity.format_table(report))
    return report


def ollama_modelfile(path: Path, tok) -> str:
    """FROM the file; Ollama reads the chat template from the GGUF itself. Stop at the EOS token."""
    lines = [f"FROM ./{path.name}"]
    if tok.eos_token:
        lines.append(f'PARAMETER stop "{tok.eos_token}"')
    return "\n".join(lines) + "\n"
