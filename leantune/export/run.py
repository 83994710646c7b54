"""`leantune export`: from what the user points at (run folder, adapter folder, HF folder, .gguf) to an
artifact in one of the registered formats (`export/base.py`), or in all of them (`--all`), through the one
merge path, each with the common fidelity report (`export/fidelity.py`).

Order of work, the same for every format: resolve the source and let the format refuse it (an
unsupported architecture fails before anything is loaded); refuse an output that exists (unless
--overwrite); then materialize the merged model (`infer/materialize.py`: any mergeable method, the
QLoRA base decided once and printed, the run's chat template on the tokenizer), hand it to the
exporter, which writes the artifact (timed, its peak memory sampled), then read the artifact back and
score it against the model: `<artifact>.fidelity.json`.

`--all` materializes once and runs every format in turn into one folder; a format that fails is a row of
the table with its one-line error and the others still run; a format whose artifact and report are both
there already is skipped, so an interrupted `--all` resumes where it stopped.
"""

from __future__ import annotations

import json
import shutil
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from ..checkpoint.run_folder import is_run_folder
from ..errors import ConfigError, LeantuneError, ModelError, first_line
from ..infer.materialize import BaseChoice, Located, check_mergeable, locate, materialize
from ..io.atomic import write_json
from ..io.outputs import check_output_dir, check_output_file
from ..models.gguf_import import gguf_to_hf
from . import fidelity
from .base import ALL_QUANTS, Exporter, ExportOptions, available, get

ALL_SUMMARY = "export_all.json"   # in the --all folder: marks it as ours (resumable) and holds the table


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


def check_output(exporter: Exporter, path: Path, *, overwrite: bool, sources: list) -> None:
    if exporter.writes_folder:
        check_output_dir(path, overwrite=overwrite, sources=sources)
    else:
        check_output_file(path, overwrite=overwrite)


def export(source: str, *, format: str = "gguf", quant: str | None = None, out: str | None = None,
           base_model: str | None = None, merge_base: BaseChoice = "dequantized", adapter_only: bool = False,
           overwrite: bool = False, options: ExportOptions | None = None) -> dict:
    """Write `source` as `format` (see the module docstring); return the fidelity report (with --adapter-only,
    the exporter's own report)."""
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
    check_output(exporter, path, overwrite=overwrite, sources=[source, folder])
    if options.modelfile:
        check_output_file(path.with_name("Modelfile"), overwrite=overwrite, flag="the Modelfile beside --out")
    options.name = options.name or stem
    model, tok, facts = materialize(source, base=merge_base, found=found, merge=not adapter_only)
    if adapter_only:
        return exporter.write_adapter(model, tok, facts, folder, path, options)
    print(f"exporting: {facts.describe()}", file=sys.stderr)
    batches, where = fidelity.held_out(tok, options.texts, found.cfg) if options.evaluate else ([], "")
    try:
        report = write_and_report(exporter, model, tok, facts, folder, path, quant, options, batches, where)
    except KeyboardInterrupt:  # the artifact is renamed into place whole; say so if only its report is missing
        if path.exists() and not fidelity.report_path(path, exporter.suffix).exists():
            print(f"{path} is complete, but its fidelity check was interrupted: rerun with --overwrite for the report "
                  f"(or add --no-eval)", file=sys.stderr)
        raise
    print(fidelity.summary(report))
    return report


def write_and_report(exporter: Exporter, model, tok, facts, folder: Path, path: Path, quant: str | None,
                     options: ExportOptions, batches: list[dict], where: str) -> dict:
    """exporter.write, timed and its memory sampled; then the fidelity report beside the artifact."""
    before = _fingerprint(model)
    with fidelity.measure() as cost:
        written = exporter.write(model, tok, facts, folder, path, quant, options) or {}
    if not torch.equal(_fingerprint(model), before):   # the report would score a changed model, --all pass it on
        raise RuntimeError(f"the {exporter.format} exporter changed the model it was given; it must work on a copy")
    return fidelity.build(exporter, model, path, quant, written, cost, facts=facts, batches=batches,
                          held_out_from=where, evaluate=options.evaluate)


def _fingerprint(model) -> torch.Tensor:
    """(tensors, 2): sum and sum of squares of every tensor of the state dict, in float64."""
    with torch.no_grad():
        return torch.stack([torch.stack([t.double().sum(), t.double().square().sum()])
                            for t in model.state_dict().values()])


# ---------------------------------------------------------------------------------------------
# --all


def all_plan() -> list[tuple[str, str | None, Exporter | None, str]]:
    """(format, quant, exporter, error) for every format `--all` writes; an exporter that cannot even be
    loaded is a row with its error."""
    plan = []
    for name in available():
        try:
            exporter = get(name)
        except Exception as e:   # a broken format is reported in the table; the others still run
            plan.append((name, None, None, f"failed: {first_line(e)}"))
            continue
        wanted = [q for q in ALL_QUANTS.get(name, ()) if q in exporter.quants] or [exporter.default_quant]
        plan.extend((name, q, exporter, "") for q in dict.fromkeys(wanted))
    return plan


def check_all_folder(path: Path, sources: list) -> None:
    """An --all folder is new, empty, or one an earlier --all made (it holds export_all.json): never a user's."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path} is a file; --all writes a folder, name a new one, e.g. --out exports/NAME")
    if path.is_dir() and any(path.iterdir()) and not (path / ALL_SUMMARY).is_file():
        raise ConfigError(f"--out {path} holds files that an earlier --all did not write; name a new folder "
                          f"(an --all folder is resumed only when it holds {ALL_SUMMARY})")
    if not (path / ALL_SUMMARY).is_file():
        check_output_dir(path, sources=sources)


def export_all(source: str, *, out: str | None = None, base_model: str | None = None,
               merge_base: BaseChoice = "dequantized", options: ExportOptions | None = None) -> dict:
    """Every format into one folder (see the module docstring); return the summary written as export_all.json."""
    options = options or ExportOptions()
    found = locate(source, base_model)
    folder = local_folder(found)
    check_mergeable(found)
    stem = Path(source).resolve().name or "model"
    outdir = Path(out) if out else default_out(source, "export") if is_run_folder(Path(source)) \
        else Path.cwd() / f"{stem}-export"
    check_all_folder(outdir, [source, folder])
    outdir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    summary = {"source": str(source), "folder": str(outdir), "formats": rows}
    write_json(outdir / ALL_SUMMARY, summary)
    loaded = None   # (model, tokenizer, facts, batches, where), materialized once when a format needs it
    opts = replace(options, name=options.name or stem, modelfile=False)
    for name, quant, exporter, error in all_plan():
        row = {"format": name, "quant": quant, "artifact": None, "status": error}
        rows.append(row)
        if exporter is None:
            continue
        try:
            exporter.check_source(folder)
            path = outdir / exporter.default_name(stem, quant, False)
            row["artifact"] = path.name
            done = fidelity.report_path(path, exporter.suffix)
            if path.exists() and done.is_file():
                row["report"], row["status"] = json.loads(done.read_text(encoding="utf-8")), "done earlier (kept)"
                continue
            _remove_partial(path, outdir)
            if loaded is None:
                model, tok, facts = materialize(source, base=merge_base, found=found, merge=True)
                print(f"exporting: {facts.describe()}", file=sys.stderr)
                loaded = (model, tok, facts, *(fidelity.held_out(tok, opts.texts, found.cfg) if opts.evaluate
                                               else ([], "")))
            print(f"--- {name} {quant or ''} -> {path}", file=sys.stderr)
            row["report"] = write_and_report(exporter, *loaded[:3], folder, path, quant, opts, *loaded[3:])
            row["status"] = "ok"
        except Exception as e:   # one format's failure is a row of the table; the others still run
            row["status"] = f"failed: {first_line(e)}"
            if not isinstance(e, LeantuneError):
                row["traceback"] = traceback.format_exc()
        write_json(outdir / ALL_SUMMARY, summary)
    print(all_table(rows))
    return summary


def _remove_partial(path: Path, outdir: Path) -> None:
    """An artifact without its report (the run stopped while scoring it) is redone: ours, inside outdir."""
    if path.resolve().parent != outdir.resolve():
        return
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def all_table(rows: list[dict]) -> str:
    lines = [fidelity.TABLE_HEADER]
    lines += [fidelity.table_row(r["format"], r["quant"], r.get("report"), r["status"]) for r in rows]
    return "\n".join(lines)
