"""Kill -9 soak: a real `leantune train` process is SIGKILLed at named points (io/faults.py), resumed, and
must end exactly as the uninterrupted run: the same adapter and the same loss curve (fp32, CPU, <= 1e-6),
TensorBoard agreeing with metrics.jsonl, and no folder that looks complete without being complete at any
moment. A few points run by default; `-m slow` runs 20 drawn at random (seeded). Merge and export killed
mid-write leave no output that looks complete, and their rerun succeeds."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from leantune.checkpoint.run_folder import checkpoint_dirs
from leantune.cli.main import main
from leantune.io.manifest import verify_manifest
from leantune.train.state import verify_saved

from .test_loop_behaviour import adapter
from .test_train_cli import write_chat_data

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
# How often a 6-step run (save every 2, eval every 2) passes each point: kill points are drawn from these.
PASSES = {"forward": 6, "backward": 6, "optimizer": 6, "log": 7, "eval": 3, "checkpoint": 3, "final": 1, "commit": 20}
DEFAULT = [("backward", 3), ("checkpoint", 2), ("final", 1), ("log", 4)]
SOAK = sorted(random.Random(16).sample([(p, n) for p, k in PASSES.items() for n in range(1, k + 1)], 20))


def write_config(tmp: Path, model_dir, out: Path) -> Path:
    data = write_chat_data(tmp / "d.jsonl", n=24)
    cfg = {"model": str(model_dir), "output_dir": str(out), "dtype": "fp32", "threads": 1,
           "data": {"path": str(data), "max_length": 64},
           "lora": {"rank": 4, "alpha": 8, "dropout": 0.1},
           "train": {"max_steps": STEPS, "batch_size": 2, "lr": 3e-3, "progress": False, "tensorboard": True,
                     "save_every": 2, "eval_every": 2, "keep_checkpoints": 0}}
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli(*argv, fault: str | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LEANTUNE_FAULT", None)
    if fault:
        env["LEANTUNE_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "leantune.cli.main", *argv], env=env, capture_output=True,
                          text=True, timeout=timeout)


def curve(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (loss, grad_norm) from metrics.jsonl; a step logged twice would fail the test."""
    out = {}
    for ln in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(ln)
        if "loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = (rec["loss"], rec["grad_norm"])
    return out


def tensorboard_losses(run_dir: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), purge_orphaned_data=True)
    acc.Reload()
    events = acc.Scalars("loss")
    steps = [e.step for e in events]
    assert len(steps) == len(set(steps)), f"TensorBoard holds a step twice: {steps}"
    return {e.step: e.value for e in events}


def assert_nothing_looks_complete_that_is_not(run_dir: Path) -> None:
    """After a kill: summary.json means finished, and was not written; every folder under its final name
    (checkpoints, adapter/) is whole."""
    assert not (run_dir / "summary.json").exists()
    for ckpt in checkpoint_dirs(run_dir):
        assert (ckpt / "manifest.json").exists() and verify_manifest(ckpt) is None, ckpt
    if (run_dir / "adapter").exists():
        verify_saved(run_dir / "adapter")


@pytest.fixture(scope="module")
def reference(tiny_llama_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("soak-ref")
    out = tmp / "ref"
    # a fresh process, like the killed runs: nothing another test registered or set in this worker reaches it
    proc = cli("train", str(write_config(tmp, tiny_llama_dir, out)))
    assert proc.returncode == 0, proc.stderr[-1500:]
    return out


def kill_and_resume(tmp: Path, model_dir, reference: Path, point: str, n: int) -> None:
    out = tmp / f"killed-{point}-{n}"
    config = write_config(tmp, model_dir, out)
    proc = cli("train", str(config), fault=f"{point}:{n}")
    assert proc.returncode == -signal.SIGKILL, f"{point}:{n} never killed it: rc {proc.returncode}\n{proc.stderr[-1500:]}"
    assert_nothing_looks_complete_that_is_not(out)
    resume = ["--resume"] if checkpoint_dirs(out) else []  # killed before the first checkpoint: start again
    assert main(["train", str(config), *resume]) == 0
    # the same adapter, the same curve, and TensorBoard agrees with both
    a, b = adapter(out), adapter(reference)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=lambda m: f"{point}:{n} {k}: {m}")
    got, want = curve(out), curve(reference)
    assert got.keys() == want.keys() == set(range(1, STEPS + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], abs=1e-6), (point, n, step)
    tb = tensorboard_losses(out)
    assert tb.keys() == got.keys() and all(abs(tb[s] - got[s][0]) < 1e-6 for s in tb)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["train_loss"] == pytest.approx(want[STEPS][0], abs=1e-6)


@pytest.mark.parametrize("point,n", DEFAULT, ids=[f"{p}-{n}" for p, n in DEFAULT])
def test_kill_9_then_resume_equals_the_uninterrupted_run(tiny_llama_dir, reference, tmp_path, point, n):
    kill_and_resume(tmp_path, tiny_llama_dir, reference, point, n)


@pytest.mark.slow
@pytest.mark.parametrize("point,n", SOAK, ids=[f"{p}-{n}" for p, n in SOAK])
def test_soak_20_random_kill_points(tiny_llama_dir, reference, tmp_path, point, n):
    kill_and_resume(tmp_path, tiny_llama_dir, reference, point, n)


def test_merge_killed_mid_write_leaves_nothing_complete_and_reruns(reference, tmp_path):
    out = tmp_path / "merged"
    proc = cli("merge", str(reference), "--out", str(out), fault="commit:1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-1500:]
    assert not out.exists()  # the folder appears whole or not at all
    proc = cli("merge", str(reference), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-1500:]
    assert (out / "config.json").exists() and list(out.glob("*.safetensors"))


def test_export_killed_mid_write_leaves_nothing_complete_and_reruns(reference, tmp_path):
    out = tmp_path / "run.gguf"
    proc = cli("export", str(reference), "--quant", "F32", "--out", str(out), "--no-eval", "--quiet", fault="commit:1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-1500:]
    assert not out.exists()
    proc = cli("export", str(reference), "--quant", "F32", "--out", str(out), "--no-eval", "--quiet")
    assert proc.returncode == 0, proc.stderr[-1500:]
    from gguf import GGUFReader

    assert len(GGUFReader(str(out)).tensors) > 0
