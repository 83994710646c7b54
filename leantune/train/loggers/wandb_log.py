"""Weights & Biases: offline unless the user chose otherwise (WANDB_MODE, or an API key in the env/netrc).

Offline runs land in `<run folder>/wandb/` (or WANDB_DIR); `wandb sync` uploads them later.
"""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any

from . import Logger


def _has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def mode() -> str:
    return os.environ.get("WANDB_MODE") or ("online" if _has_key() else "offline")


class WandbLogger(Logger):
    name = "wandb"

    def start(self, run_dir: Path, run_name: str, params: dict[str, Any], resume_step: int) -> None:
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "leantune"), name=run_name,
                              dir=os.environ.get("WANDB_DIR") or str(run_dir), config=params, mode=mode(),
                              reinit="create_new", settings=wandb.Settings(silent=True, console="off"))

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def make() -> Logger:
    return WandbLogger()
