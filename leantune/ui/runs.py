"""The run folders under a root, read for the page: status, curves, memory, data report, checkpoints.

Read-only and tolerant: a run being written (a metrics line torn mid-write, no summary yet) is shown as
it is. The layout is checkpoint/run_folder.py's; a run's id is its folder relative to the root, and an
id that leaves the root is refused.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

from ..checkpoint.run_folder import CHECKPOINTS, RunFolder, is_run_folder
from ..errors import ConfigError
from ..train.metrics import read_metrics

MAX_DEPTH = 3          # runs/group/name: deep enough for a root of grouped runs, shallow enough to be quick
MAX_POINTS = 2000      # per curve: a long run is thinned evenly, its last point kept


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def find_runs(root: Path) -> list[Path]:
    """Every run folder under `root` (itself included), newest activity first."""
    root = Path(root)
    found = []
    for here, dirs, _ in os.walk(root):
        depth = len(Path(here).relative_to(root).parts)
        if is_run_folder(here):
            found.append(Path(here))
            dirs[:] = []  # a run's checkpoints are not runs
            continue
        if depth >= MAX_DEPTH:
            dirs[:] = []
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(found, key=_activity, reverse=True)


def _activity(run: Path) -> float:
    f = RunFolder(run)
    return max((p.stat().st_mtime for p in (f.metrics, f.summary, f.config) if p.exists()), default=0.0)


def status(run: Path) -> str:
    """completed | early_stopped (summary.json), running (a live process holds the lock), stopped (it
    ended without a summary: interrupted or crashed), or starting (nothing logged yet)."""
    f = RunFolder(run)
    summary = _json(f.summary)
    if summary is not None:
        return str(summary.get("status", "completed"))
    if _held(f.lock):
        return "running"
    return "stopped" if f.metrics.exists() else "starting"


def _held(lock: Path) -> bool:
    """A lock file whose pid (io/lock.py writes "pid host") is a live process on this host."""
    try:
        pid, host = lock.read_text(encoding="utf-8").split()[:2]
        if host != socket.gethostname():
            return True  # another host's run: cannot check it from here, so trust the lock
        os.kill(int(pid), 0)
    except PermissionError:  # alive, another user's
        return True
    except (OSError, ValueError):  # gone, or a torn lock file
        return False
    return True


def resolve(root: Path, run_id: str) -> Path:
    """The run folder `run_id` names under `root`; a ConfigError for anything else."""
    root = Path(root).resolve()
    path = (root / run_id).resolve()
    if (path != root and root not in path.parents) or not is_run_folder(path):
        raise ConfigError(f"no run {run_id!r} under {root}; the runs list shows the ids")
    return path


def run_id(root: Path, run: Path) -> str:
    rel = Path(run).resolve().relative_to(Path(root).resolve()).as_posix()
    return rel if rel != "." else "."


def _config_facts(run: Path) -> dict:
    """A few fields of config.yaml for the list, read without validating (an old run may not validate)."""
    import yaml

    try:
        raw = yaml.safe_load(RunFolder(run).config.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    train = raw.get("train") or {}
    quant = raw.get("quant") or {}
    data = raw.get("data") or {}
    return {"model": raw.get("model"), "method": raw.get("method", "lora"), "quant_bits": quant.get("bits"),
            "batch_size": train.get("batch_size"), "grad_accum": train.get("grad_accum"),
            "max_length": data.get("max_length"), "lr": train.get("lr"),
            "gradient_checkpointing": train.get("gradient_checkpointing")}


def _thin(points: list) -> list:
    if len(points) <= MAX_POINTS:
        return points
    stride = len(points) / MAX_POINTS
    return [points[int(i * stride)] for i in range(MAX_POINTS - 1)] + [points[-1]]


def run_row(root: Path, run: Path) -> dict:
    """One line of the runs list."""
    f = RunFolder(run)
    summary = _json(f.summary) or {}
    records = read_metrics(f.metrics) if f.metrics.exists() else []
    losses = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    return {"id": run_id(root, run), "name": run.name, "status": status(run), **_config_facts(run),
            "steps": summary.get("steps", losses[-1]["step"] if losses else 0),
            "total_steps": summary.get("total_steps"),
            "train_loss": summary.get("train_loss", losses[-1]["loss"] if losses else None),
            "eval_loss": summary.get("eval_loss", evals[-1]["eval_loss"] if evals else None),
            "updated": _activity(run)}


def run_detail(root: Path, run: Path) -> dict:
    """Everything the run's panel shows: the curves, the memory breakdown, the data report, checkpoints."""
    f = RunFolder(run)
    records = read_metrics(f.metrics) if f.metrics.exists() else []
    summary = _json(f.summary)
    memory = (summary or {}).get("memory") or next((r for r in records if "mem_peak_bytes" in r), None)
    if memory is not None:
        memory = {k: v for k, v in memory.items() if k.startswith("mem_")}
    ckpts = []
    for c in f.checkpoints():
        size = sum(p.stat().st_size for p in c.rglob("*") if p.is_file())
        ckpts.append({"name": c.name, "step": int(c.name.split("-")[1]), "bytes": size})
    return {
        **run_row(root, run),
        "train": _thin([[r["step"], r["loss"]] for r in records if "loss" in r]),
        "eval": _thin([[r["step"], r["eval_loss"]] for r in records if "eval_loss" in r]),
        "lr": _thin([[r["step"], r["lr"]] for r in records if "lr" in r]),
        "tokens_per_s": _thin([[r["step"], r["tokens_per_s"]] for r in records if "tokens_per_s" in r]),
        "memory": memory,
        "fit": (summary or {}).get("fit"),
        "data_report": _json(f.data_report),
        "checkpoints": ckpts,
        "output": next((d.name for d in (f.adapter, f.model) if d.is_dir()), None),
        "summary": summary,
        "checkpoints_dir": str(run / CHECKPOINTS),
    }
