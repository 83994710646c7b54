"""Experiment trackers beside metrics.jsonl and TensorBoard: `train.report_to: [tensorboard, wandb, mlflow]`.

One interface (`Logger`: start, log, close), one module per tracker, a registry like the exporters'. Each
tracker gets the same scalars as metrics.jsonl (loss, lr, eval, tokens/s, memory), the run config as
params, and the run folder's name as the run name. Both are offline-safe by default: W&B runs in offline
mode unless the user set WANDB_MODE or holds an API key; MLflow writes a local `file:` store under the run
folder unless MLFLOW_TRACKING_URI is set.

A tracker that is named but not installed is refused before the model loads (`check_installed`). A tracker
that fails mid-run never stops training: `Trackers` warns once and drops it.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any, Callable

from ...errors import ConfigError

# name -> (module under this package, the import it needs, the pip package that provides it)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "wandb": ("wandb_log", "wandb", "wandb"),
    "mlflow": ("mlflow_log", "mlflow", "mlflow-skinny"),
}


class Logger:
    """What a tracker implements. `start` may raise (the run then goes on without it)."""

    name = ""

    def start(self, run_dir: Path, run_name: str, params: dict[str, Any], resume_step: int) -> None:
        raise NotImplementedError

    def log(self, step: int, values: dict[str, float]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def trackers_of(report_to: list[str]) -> list[str]:
    """The names in report_to that this package handles (TensorBoard stays with the metrics log)."""
    return [n for n in report_to if n in REGISTRY]


def check_installed(report_to: list[str]) -> None:
    """A tracker named but not importable: one line naming the pip install, before anything loads."""
    for name in trackers_of(report_to):
        _, module, pip = REGISTRY[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"train.report_to names {name}, which is not installed: pip install {pip} "
                              f"(or drop {name} from report_to)")


def flat_params(cfg: dict, prefix: str = "") -> dict[str, str]:
    """The run config as flat `section.key` -> string params (the form both trackers show and compare)."""
    out: dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = str(v)[:500]
    return out


class Trackers:
    """The started trackers; each failure is reported once through `warn` and that tracker is dropped."""

    def __init__(self, report_to: list[str], run_dir: Path, params: dict, resume_step: int = 0,
                 warn: Callable[[str], None] = print):
        self.warn, self.active = warn, []
        run_dir = Path(run_dir)
        for name in trackers_of(report_to):
            mod = importlib.import_module(f"{__name__}.{REGISTRY[name][0]}")
            logger: Logger = mod.make()
            try:
                logger.start(run_dir, run_dir.name, params, resume_step)
            except Exception as e:  # noqa: BLE001 - a tracker never stops a run
                self._drop(logger, "could not start", e)
                continue
            self.active.append(logger)

    def _drop(self, logger: Logger, what: str, e: BaseException) -> None:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = first if len(first) <= 160 else first[:157] + "..."
        self.warn(f"warning: {logger.name} {what} ({type(e).__name__}: {first}); "
                  f"the run goes on, metrics.jsonl has every value")
        if logger in self.active:
            self.active.remove(logger)
            try:
                logger.close()
            except Exception:  # noqa: BLE001
                pass

    def log(self, step: int, values: dict[str, Any]) -> None:
        scalars = {k: float(v) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if not scalars:
            return
        for logger in list(self.active):
            try:
                logger.log(step, scalars)
            except Exception as e:  # noqa: BLE001
                self._drop(logger, "failed while logging", e)

    def close(self) -> None:
        for logger in list(self.active):
            try:
                logger.close()
            except Exception as e:  # noqa: BLE001
                self._drop(logger, "failed while closing", e)
        self.active = []
