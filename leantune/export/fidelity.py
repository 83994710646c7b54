"""The fidelity report written beside every export, the same for every format: how close the artifact is
to the model it came from, what it costs on disk, and what it cost to make.

    <artifact stem>.fidelity.json   (m.gguf -> m.fidelity.json; the folder m-W8A16/ -> m-W8A16.fidelity.json)

  * model level: the artifact read back by its exporter (`Exporter.load_back`, dequantized to float32) and
    the source model scored on the same held-out batches by `eval/compare.py`: perplexity of both, the
    KL of the export's next-token distribution from the source's, and greedy top-1 agreement (the share of
    positions where both predict the same next token). Skipped, and said so, with --no-eval or for a
    format that cannot be read back;
  * size: bytes on disk (all files of a folder), and bits per weight = 8 * stored tensor bytes / the source
    model's parameter count (tied embeddings count once; norms and embeddings kept in 16 bits count too,
    which is why a "4-bit" export of a small model lands well above 4);
  * cost: seconds of `write` and the peak resident memory (RSS) of the process while it ran;
  * the format's own part (GGUF: per-tensor error) and, under `merge`, what was merged into what.

Held-out text: `--eval-text`, else the run's own eval split when the source is a run folder
(`eval/held_out.py`), else a few sentences of plain prose (`DEFAULT_TEXTS`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import LeantuneError, first_line
from ..eval.compare import compare, text_batches
from ..eval.held_out import held_out_batches
from ..io.atomic import write_json

# Held-out text when the user gives none and the source is no run: plain English prose not drawn from any
# training set we ship.
DEFAULT_TEXTS = [
    "The river had carved its way through the valley for thousands of years, and the town that grew along "
    "its banks learned to read the water the way sailors read the sky.",
    "To make a good cup of tea, warm the pot first, use fresh water that has just come to the boil, and let "
    "the leaves steep for three to five minutes before pouring.",
    "In 1905 Albert Einstein published four papers that changed physics: on the photoelectric effect, on "
    "Brownian motion, on special relativity, and on the equivalence of mass and energy.",
]
HELD_OUT_BATCHES = 4   # batches of a run's eval split scored (each up to train.batch_size x data.max_length)


def report_path(out: Path, suffix: str = "") -> Path:
    """Where the report of the artifact `out` goes: beside it, named after it without its suffix."""
    stem = out.name.removesuffix(suffix) if suffix else out.name
    return out.with_name(f"{stem}.fidelity.json")


def held_out(tokenizer, texts: list[str] | None, run_cfg=None) -> tuple[list[dict], str]:
    """(batches to score, where they came from): see the module docstring."""
    if texts:
        return text_batches(tokenizer, texts), "--eval-text"
    if run_cfg is not None:
        with contextlib.suppress(LeantuneError, OSError):   # the run's data moved or is gone: prose instead
            batches, where, _ = held_out_batches(run_cfg, tokenizer, HELD_OUT_BATCHES)
            if batches:
                return batches, f"the run's {where}"
    return text_batches(tokenizer, DEFAULT_TEXTS), "built-in prose (pass --eval-text for your own)"


@dataclass
class Cost:
    seconds: float = 0.0
    rss_before_bytes: int = 0
    peak_rss_bytes: int = 0


def _rss() -> int:
    """Resident memory of this process now (Linux); elsewhere the peak so far, the best a portable call gives."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def measure(interval: float = 0.02) -> Iterator[Cost]:
    """Time a block and sample its resident memory every `interval` seconds; the peak is in the Cost after."""
    cost = Cost(rss_before_bytes=_rss())
    cost.peak_rss_bytes = cost.rss_before_bytes
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(interval):
            cost.peak_rss_bytes = max(cost.peak_rss_bytes, _rss())

    sampler = threading.Thread(target=sample, name="leantune-rss", daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        yield cost
    finally:
        cost.seconds = time.perf_counter() - t0
        stop.set()
        sampler.join()
        cost.peak_rss_bytes = max(cost.peak_rss_bytes, _rss())


def size_on_disk(out: Path) -> int:
    if out.is_dir():
        return sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return out.stat().st_size


def safetensors_bytes(out: Path) -> int | None:
    """Bytes of tensor data in the safetensors file(s) at `out` (from their headers), None when there are none."""
    files = sorted(out.glob("*.safetensors")) if out.is_dir() else [out] if out.suffix == ".safetensors" else []
    if not files:
        return None
    total = 0
    for f in files:
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))                  # header length, then a JSON header
            header = json.loads(fh.read(n))
        total += sum(end - start for k, v in header.items() if k != "__metadata__" for start, end in [v["data_offsets"]])
    return total


def parameter_count(model) -> int:
    """Parameters of the source model, a tied embedding once (parameters() already yields it once)."""
    return sum(p.numel() for p in model.parameters())


def model_scores(exporter, model, out: Path, batches: list[dict]) -> dict | str:
    """compare(source, artifact read back) as the report's "model" entry, or why there is none."""
    back = exporter.load_back(out)
    if back is None:
        return f"skipped: --format {exporter.format} has no read-back into torch yet"
    try:
        s = compare(model, back, batches)
    finally:
        del back
        gc.collect()
    if not s.get("tokens"):
        return "skipped: no held-out token to score"
    ref, cand = s["perplexity_reference"], s["perplexity_candidate"]
    return {"tokens": s["tokens"], "perplexity_source": ref, "perplexity_export": cand,
            "perplexity_delta_pct": 100 * (cand / ref - 1), "kl_mean": s["kl_mean"], "kl_max": s["kl_max"],
            "top1_agreement": s["top1_agreement"]}


def build(exporter, model, out: Path, quant: str | None, written: dict, cost: Cost, *, facts=None,
          batches: list[dict] | None = None, held_out_from: str = "", evaluate: bool = True) -> dict:
    """The report of one written artifact (see the module docstring), written atomically beside it."""
    n_params = parameter_count(model)
    stored = written.get("stored_bytes") or safetensors_bytes(out) or size_on_disk(out)
    report = {"format": exporter.format, "quant": quant, "file": out.name, "file_bytes": size_on_disk(out),
              "parameters": n_params, "bits_per_weight": 8 * stored / max(n_params, 1),
              "export_seconds": round(cost.seconds, 2), "rss_before_bytes": cost.rss_before_bytes,
              "peak_rss_bytes": cost.peak_rss_bytes}
    report.update({k: v for k, v in written.items() if k not in report})
    if not evaluate:
        scores: dict | str = "skipped: --no-eval"
    else:
        try:
            scores = model_scores(exporter, model, out, batches or [])
        except Exception as e:   # the artifact is written; a read-back that fails is reported, not fatal
            scores = f"failed: the artifact could not be read back: {first_line(e)}"
    report["model"] = scores if isinstance(scores, dict) else None
    if isinstance(scores, dict):
        report["model"]["held_out"] = held_out_from
    else:
        report["model_note"] = scores
    if facts is not None:
        report["merge"] = facts.as_dict()
    write_json(report_path(out, exporter.suffix), report)
    return report


def summary(report: dict) -> str:
    """Two lines for the terminal after one export."""
    lines = [f"{report['file']}: {report['format']} {report['quant'] or ''}, {report['file_bytes'] / 1e6:.1f} MB, "
             f"{report['bits_per_weight']:.2f} bits/weight, {report['export_seconds']:.1f} s, "
             f"peak RSS {report['peak_rss_bytes'] / 2**30:.2f} GiB"]
    m = report.get("model")
    if m:
        lines.append(f"held-out perplexity {m['perplexity_source']:.3f} -> {m['perplexity_export']:.3f} "
                     f"({m['perplexity_delta_pct']:+.2f}%), KL {m['kl_mean']:.2e}, greedy top-1 agreement "
                     f"{100 * m['top1_agreement']:.1f}% over {m['tokens']} tokens ({m['held_out']})")
    else:
        lines.append(f"model-level check {report.get('model_note', 'skipped')}")
    return "\n".join(lines)


TABLE_HEADER = (f"{'format':<8}{'quant':<10}{'MB':>9}{'bits/w':>8}{'ppl':>9}{'Δppl %':>9}{'KL':>10}{'top-1 %':>9}"
                f"{'time s':>8}{'peak GiB':>9}  status")


def table_row(fmt: str, quant: str | None, report: dict | None, status: str) -> str:
    """One line of the `--all` table; a failed format shows its one-line error in the status column."""
    if report is None:
        return f"{fmt:<8}{quant or '-':<10}{'':>9}{'':>8}{'':>9}{'':>9}{'':>10}{'':>9}{'':>8}{'':>9}  {status}"
    m = report.get("model") or {}
    # An untrained or tiny model's perplexity runs to billions: in exponent form it keeps to its column
    # (fixed-point ran it into bits/w).
    ppl = ("-" if not m else f"{m['perplexity_export']:.3f}" if m['perplexity_export'] < 1e4
           else f"{m['perplexity_export']:.2e}")
    delta = ("-" if not m else f"{m['perplexity_delta_pct']:+.2f}" if abs(m['perplexity_delta_pct']) < 1e4
             else f"{m['perplexity_delta_pct']:+.1e}")
    kl = f"{m['kl_mean']:.2e}" if m else "-"
    top1 = f"{100 * m['top1_agreement']:.1f}" if m else "-"
    return (f"{fmt:<8}{quant or '-':<10}{report['file_bytes'] / 1e6:>9.1f}{report['bits_per_weight']:>8.2f}{ppl:>9}"
            f"{delta:>9}{kl:>10}{top1:>9}{report['export_seconds']:>8.1f}{report['peak_rss_bytes'] / 2**30:>9.2f}  "
            f"{status}")
