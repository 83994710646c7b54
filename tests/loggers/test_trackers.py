"""W&B and MLflow beside metrics.jsonl: a tiny run logs to both offline, and what each library reads back
equals the run's metrics.jsonl; a tracker that is not installed is refused before loading; one that fails
mid-run warns once and the run finishes. No network: W&B offline in a temp WANDB_DIR, MLflow a file: store."""

from __future__ import annotations

import json
import math
import struct
import sys

import pytest

from leantune.cli.main import main
from leantune.train import loggers
from tests.e2e.test_train_cli import base_args, read_metrics, write_chat_data

wandb = pytest.importorskip("wandb")
pytest.importorskip("mlflow")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    for k in ("WANDB_API_KEY", "MLFLOW_TRACKING_URI", "WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "no_netrc"))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    (tmp_path / "wandb_dir").mkdir()


def wandb_records(wandb_file) -> tuple[list[dict], dict]:
    """(history rows, config) of an offline run, read from its .wandb transaction log with wandb's own protobuf.
    The log is W&B's LevelDB-style framing: a 7-byte header, then 32 KiB blocks of records, each record
    `crc32 (4) | length (2) | type (1)` + payload, split across blocks as FULL(1)/FIRST(2)/MIDDLE(3)/LAST(4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = wandb_file.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, rows, config, parts = 7, 32768, [], {}, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            parts = b""
            kind_of = rec.WhichOneof("record_type")
            if kind_of == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            elif kind_of in ("run", "config"):
                items = rec.run.config.update if kind_of == "run" else rec.config.update
                config.update({i.key: json.loads(i.value_json) for i in items})
                if kind_of == "run" and rec.run.display_name:
                    config["_name"] = rec.run.display_name
    return rows, config


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def test_wandb_and_mlflow_receive_what_metrics_jsonl_holds(tiny_llama_dir, tmp_path, offline):
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    out = tmp_path / "my-run"
    rc = main(base_args(tiny_llama_dir, data, out, "--train.max_steps", "4", "--train.eval_every", "2",
                        "--dtype", "fp32", "--train.report_to", "[wandb, mlflow]"))
    assert rc == 0
    expected: dict[tuple[int, str], float] = {}
    for rec in read_metrics(out):
        for k, v in rec.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool):
                expected[(rec["step"], k)] = float(v)
    assert any(k == "loss" for _, k in expected) and any(k == "eval_loss" for _, k in expected)

    # MLflow: its own client on the file store in the run folder
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("leantune").experiment_id])
    assert run.info.run_name == "my-run" and run.info.status == "FINISHED"
    assert run.data.params["lora.rank"] == "4" and run.data.params["train.max_steps"] == "4"
    got = {(m.step, key): m.value for key in run.data.metrics for m in client.get_metric_history(run.info.run_id, key)}
    assert got.keys() == expected.keys()
    assert all(same(got[k], expected[k]) for k in expected)

    # W&B: the offline run's transaction log
    (wfile,) = (tmp_path / "wandb_dir").glob("wandb/offline-run-*/run-*.wandb")
    rows, config = wandb_records(wfile)
    got = {(int(r["_step"]), k): float(v) for r in rows for k, v in r.items()
           if not k.startswith("_") and isinstance(v, (int, float))}
    assert got.keys() == expected.keys()
    assert all(same(got[k], expected[k]) for k in expected)
    assert config["_name"] == "my-run" and config["lora.rank"] == "4" and config["train.report_to"] == "['wandb', 'mlflow']"


def test_a_tracker_that_is_not_installed_is_refused_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # find_spec raises ValueError for None entries
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None if name == "mlflow" else object())
    data = write_chat_data(tmp_path / "d.jsonl", n=4)
    rc = main(base_args(tmp_path / "no-such-model", data, tmp_path / "run", "--train.report_to", "[mlflow]"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].endswith("pip install mlflow-skinny (or drop mlflow from report_to)")
    assert not (tmp_path / "run").exists()


def test_a_tracker_failing_mid_run_warns_once_and_training_finishes(tiny_llama_dir, tmp_path, offline,
                                                                      monkeypatch, capsys):
    from leantune.train.loggers import mlflow_log

    calls = []

    def broken(self, step, values):
        calls.append(step)
        raise OSError("disk full\nsecond line")

    monkeypatch.setattr(mlflow_log.MlflowLogger, "log", broken)
    data = write_chat_data(tmp_path / "d.jsonl", n=16)
    out = tmp_path / "run"
    assert main(base_args(tiny_llama_dir, data, out, "--train.max_steps", "3",
                          "--train.report_to", "[mlflow]")) == 0
    text = capsys.readouterr()
    warnings = [ln for ln in (text.out + text.err).splitlines() if "mlflow failed while logging" in ln]
    assert len(warnings) == 1 and "disk full" in warnings[0] and len(calls) == 1
    assert len([m for m in read_metrics(out) if "loss" in m]) == 3
