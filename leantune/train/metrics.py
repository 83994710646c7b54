"""Metrics: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard when it is installed, and to
W&B / MLflow when `train.report_to` names them (train/loggers/).

The JSONL file is the source of truth (easy to plot, grep or load with pandas); TensorBoard is a
convenience. Lines are flushed as they are written, so a crash loses at most the line in flight.

A resume (or a rollback) rewinds both to the step it continues from: metrics.jsonl keeps only the lines up
to it, and the TensorBoard writer starts with `purge_step` one past it, so TensorBoard drops the events a
killed run wrote after its checkpoint instead of drawing the lost tail beside the new one.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

from ..checkpoint.run_folder import METRICS, TENSORBOARD
from ..io.atomic import write_text
from ..io.faults import fault_point
from .loggers import Trackers, flat_params


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


def _after_existing_event_files(folder: Path) -> None:
    """TensorBoard reads a folder's event files in name order, and a name starts with the second it was
    made in: a purge only works from a file that sorts after the ones it purges. Wait (at most a second,
    and only when a resume follows its crash within the same second) until a new name sorts last."""
    stamps = [int(m.group(1)) for f in folder.glob("events.out.tfevents.*")
              if (m := re.match(r"events\.out\.tfevents\.(\d+)\.", f.name))]
    if stamps and time.time() < max(stamps) + 1:
        time.sleep(max(stamps) + 1 - time.time())


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool, resume_step: int = 0, report_to: list[str] = (),
                 params: dict | None = None, console=print):
        self.run_dir, self.path = Path(run_dir), Path(run_dir) / METRICS
        if not resume_step:  # a new run (or one started again before its first checkpoint) starts clean
            self.path.unlink(missing_ok=True)
            shutil.rmtree(self.run_dir / TENSORBOARD, ignore_errors=True)
        self._f = self._tb = None
        self.tb_note = None
        self._tensorboard = tensorboard
        self._open(resume_step)
        self.trackers = Trackers(list(report_to), self.run_dir, flat_params(params or {}), resume_step, warn=console)

    def _open(self, step: int) -> None:
        if step and self.path.exists():
            # Drop lines past the checkpoint we continue from: they belong to the lost tail of the run.
            kept = [ln for ln, rec in _records(self.path) if rec.get("step", 0) <= step]
            write_text(self.path, "".join(ln + "\n" for ln in kept))
        self._f = open(self.path, "a", encoding="utf-8")
        if self._tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                if step:
                    _after_existing_event_files(self.run_dir / TENSORBOARD)
                self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD), purge_step=step + 1 if step else None)
            except ImportError:
                self.tb_note = "tensorboard is not installed; metrics go to metrics.jsonl only (pip install tensorboard)"

    def rewind(self, step: int) -> None:
        """Continue from `step` (a rollback): forget what was logged after it, in both places."""
        self.close(trackers=False)  # the trackers keep their run; the steps after `step` are logged again
        self._open(step)

    def log(self, step: int, **values: float) -> None:
        rec = {"step": step, "time": round(time.time(), 3), **values}
        line = json.dumps(rec) + "\n"
        self._f.write(line[: len(line) // 2])
        self._f.flush()
        fault_point("log")  # a kill here leaves a torn line, which readers skip
        self._f.write(line[len(line) // 2:])
        self._f.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()  # as the JSONL line: a kill -9 must not take steps a checkpoint already holds
        self.trackers.log(step, values)

    def close(self, trackers: bool = True) -> None:
        self._f.close()
        if trackers:
            self.trackers.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None


class Throughput:
    """Tokens per second since the last read (the first read counts from construction)."""

    def __init__(self) -> None:
        self._since, self._tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def read(self) -> float:
        now = time.perf_counter()
        rate = self._tokens / max(now - self._since, 1e-9)
        self._since, self._tokens = now, 0
        return rate
