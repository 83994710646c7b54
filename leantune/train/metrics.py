"""Metrics: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard when it is installed.

The JSONL file is the source of truth (easy to plot, grep or load with pandas); TensorBoard is a
convenience. Lines are flushed as they are written, so a crash loses at most the line in flight.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..checkpoint.run_folder import METRICS, TENSORBOARD
from ..io.atomic import write_text


def _records(path: Path):
    """(line, record) for every whole line; a line torn by a crash mid-write is skipped."""
    for ln in Path(path).read_text(encoding="utf-8").split("\n"):
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict):
            yield ln, rec


def read_metrics(path: Path) -> list[dict]:
    return [rec for _, rec in _records(path)]


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0):
        self.path = Path(run_dir) / METRICS
        if resume_step and self.path.exists():
            # Drop lines past the checkpoint we resume from: they belong to the lost tail of the run.
            kept = [ln for ln, rec in _records(self.path) if rec.get("step", 0) <= resume_step]
            write_text(self.path, "".join(ln + "\n" for ln in kept))
        elif self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        self.tb_note = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / TENSORBOARD))
            except ImportError:
                self.tb_note = "tensorboard is not installed; metrics go to metrics.jsonl only (pip install tensorboard)"

    def log(self, step: int, **values: float) -> None:
        rec = {"step": step, "time": round(time.time(), 3), **values}
        self._f.write(json.dumps(rec) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
