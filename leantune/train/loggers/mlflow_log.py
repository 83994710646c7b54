"""MLflow: a local `file:` store at `<run folder>/mlruns` unless MLFLOW_TRACKING_URI is set.

(MLflow 3 keeps the file store in maintenance mode and asks for MLFLOW_ALLOW_FILE_STORE=true: leantune sets it
for its own store only.) Read it with `mlflow ui --backend-store-uri <run folder>/mlruns` or `mlflow.tracking.MlflowClient`. The
experiment is MLFLOW_EXPERIMENT_NAME, else "leantune"; the run is named after the run folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from . import Logger

STORE = "mlruns"


def tracking_uri(run_dir: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path(run_dir).resolve() / STORE).as_uri()


class MlflowLogger(Logger):
    name = "mlflow"

    def start(self, run_dir: Path, run_name: str, params: dict[str, Any], resume_step: int) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3.x refuses a file: store unless this is set; mlflow-skinny has no SQL backend, and a
            # store in the run folder needs no server. A URI the user set is used as it is.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=tracking_uri(run_dir))
        exp_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "leantune")
        exp = self.client.get_experiment_by_name(exp_name)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(exp_name)
        self.run_id = self.client.create_run(exp_id, run_name=run_name,
                                             tags={"leantune.resume_step": str(resume_step)}).info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def make() -> Logger:
    return MlflowLogger()
