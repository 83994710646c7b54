"""What the loop does when something goes wrong mid-run: a non-finite loss or gradient (train.on_nonfinite),
temporary files a dead run left behind. (A disk too full for the next checkpoint, and a saved file that
does not read back, are the checkpoint code's: train/state.py.)

Plain functions the loop (train/loop.py) calls; the policies and their guarantees are in docs/reliability.md.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint.run_folder import CHECKPOINTS, checkpoint_dirs
from ..errors import TrainingError
from .state import load_checkpoint

STALE = re.compile(r"^\..+\.(tmp|old)$")  # io/atomic.py's temporaries: .NAME.XXXX.tmp, and .NAME.old


class NonFinite(Exception):
    """A step's loss or gradient norm is NaN or infinite; the loop decides (train.on_nonfinite)."""

    def __init__(self, value: float, what: str, step: int):
        super().__init__(f"the {what} became {value} at step {step}")
        self.value, self.what, self.step = value, what, step


# ---------------------------------------------------------------------------------------------
# Non-finite loss or gradient


def likely_causes(model, lr: float) -> str:
    """The usual suspects, most specific first: fp16 on a model trained in bf16, the learning rate, the data."""
    causes = []
    trained = str(getattr(model.config, "torch_dtype", None) or getattr(model.config, "dtype", "")).removeprefix("torch.")
    running = next((p.dtype for p in model.parameters()), None)
    if running == torch.float16 and trained == "bfloat16":
        causes.append("fp16 on a model trained in bf16 (its activations overflow fp16's 65504: use dtype bf16 or fp32)")
    causes.append(f"a learning rate too high (train.lr={lr:g}; try {lr / 4:g})")
    causes.append("no gradient clipping (train.max_grad_norm)")
    if running == torch.float16 and trained != "bfloat16":
        causes.append("fp16 overflow (use bf16 or fp32)")
    causes.append("a corrupt example (check the data with `leantune inspect-data`)")
    return "; ".join(causes)


def recover(s, e: NonFinite, console: Callable[[str], None]) -> None:
    """Apply train.on_nonfinite to the step `e` stopped: raise for stop (and past the cap), else drop the
    step's gradients (skip_batch) or reload the last checkpoint, keeping the data position (rollback)."""
    t, progress = s.cfg.train, s.progress
    s.optimizer.zero_grad(set_to_none=True)
    ckpts = checkpoint_dirs(s.run_dir)
    kept = f"the last good checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
    causes = likely_causes(s.model, t.lr)
    if t.on_nonfinite == "stop":
        raise TrainingError(f"{e}; {kept}. Likely causes: {causes}. (train.on_nonfinite skip_batch or "
                            "rollback goes on past such steps)")
    progress.nonfinite += 1
    if progress.nonfinite > t.max_nonfinite:
        raise TrainingError(f"{e}, the {progress.nonfinite}th non-finite step of this run (train.max_nonfinite "
                            f"{t.max_nonfinite}); {kept}. Likely causes: {causes}")
    if t.on_nonfinite == "rollback":
        if not ckpts:
            raise TrainingError(f"{e}; train.on_nonfinite rollback needs a checkpoint and none was written yet: "
                                "lower train.save_every, or use skip_batch")
        epoch, index, count = progress.epoch, progress.batch_index, progress.nonfinite
        restored = load_checkpoint(ckpts[-1], s.model, s.optimizer)
        progress.__dict__.update(restored.__dict__)
        progress.epoch, progress.batch_index, progress.nonfinite = epoch, index, count
        s.log.rewind(progress.step)
        console(f"warning: {e}; rolled back to {ckpts[-1].name} (step {progress.step}) and go on past the "
                f"batches since ({count} of train.max_nonfinite {t.max_nonfinite})")
    else:
        console(f"warning: {e}; skipped that step's batches, no update ({progress.nonfinite} of "
                f"train.max_nonfinite {t.max_nonfinite})")
    s.log.log(progress.step, nonfinite=progress.nonfinite)


# ---------------------------------------------------------------------------------------------
# Before and after a checkpoint


def clean_stale(run_dir: Path, console: Callable[[str], None]) -> list[Path]:
    """Remove the temporaries of writes that never finished (a run killed mid-save): `.NAME.*.tmp` and
    `.NAME.old` in the run folder and its checkpoints/. Called with the run's lock held, so no live
    writer owns them."""
    found = [p for d in (run_dir, run_dir / CHECKPOINTS) if d.is_dir() for p in d.iterdir() if STALE.match(p.name)]
    for p in found:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    if found:
        console(f"note: removed {len(found)} unfinished temporary file(s) left by a run that stopped mid-write "
                f"({', '.join(sorted(p.name for p in found)[:3])}{', ...' if len(found) > 3 else ''})")
    return found
