"""Faults injected into a real run: SIGTERM (preemption) and Ctrl-C during the final save resume with
nothing lost; a dead run's temporaries are cleaned; a NaN step is stopped, skipped or rolled back by
train.on_nonfinite, with a cap; the error names the likely causes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from leantune.errors import TrainingError
from leantune.train.loop import run

from .test_loop_behaviour import adapter, make_cfg, quiet
from .test_train_cli import write_chat_data

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def data(tmp_path):
    return write_chat_data(tmp_path / "d.jsonl", n=24)


@pytest.fixture
def reference(tiny_llama_dir, data, tmp_path_factory):
    """The uninterrupted run every faulted one must end equal to."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(make_cfg(tiny_llama_dir, data, out, save_every=0), console=quiet)
    return out


def assert_same_adapter(a_dir, b_dir):
    a, b = adapter(a_dir), adapter(b_dir)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def poison(monkeypatch, when, effect):
    """Make the micro-batch forward do `effect(loss)` on the calls `when(n)` picks (1 micro-batch per step)."""
    from leantune.train import step as step_mod

    orig, calls = step_mod.micro_batch_loss, {"n": 0}

    def hooked(model, batch, **kw):
        calls["n"] += 1
        loss, n = orig(model, batch, **kw)
        return (effect(loss) if when(calls["n"]) else loss), n

    monkeypatch.setattr(step_mod, "micro_batch_loss", hooked)
    return orig


# ---------------------------------------------------------------------------------------------
# SIGTERM and Ctrl-C


def test_sigterm_checkpoints_the_last_finished_step_and_resume_is_exact(tiny_llama_dir, data, tmp_path,
                                                                        monkeypatch, reference):
    from leantune.train import step as step_mod

    orig = step_mod.micro_batch_loss
    calls = {"n": 0}

    def term(model, batch, **kw):
        calls["n"] += 1
        if calls["n"] == 4:  # inside step 4: steps 1-3 are done
            os.kill(os.getpid(), signal.SIGTERM)
        return orig(model, batch, **kw)

    monkeypatch.setattr(step_mod, "micro_batch_loss", term)
    lines = []
    out = tmp_path / "term"
    res = run(make_cfg(tiny_llama_dir, data, out, save_every=0), console=lines.append)
    assert res.stopped == "terminated" and res.steps == 3
    assert any("SIGTERM" in ln and "--resume" in ln for ln in lines)
    assert (out / "checkpoints" / "step-000003" / "manifest.json").exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is ours only while training
    monkeypatch.setattr(step_mod, "micro_batch_loss", orig)
    assert run(make_cfg(tiny_llama_dir, data, out, save_every=0), resume=True, console=quiet).steps == 6
    assert_same_adapter(out, reference)


def test_sigterm_exits_143_from_the_cli(tiny_llama_dir, data, tmp_path):
    """A real process and a real signal (the fault hook sends SIGTERM inside the 3rd backward pass)."""
    out = tmp_path / "cli"
    argv = ["train", "--model", str(tiny_llama_dir), "--data.path", str(data), "--output_dir", str(out),
            "--train.progress", "false", "--train.tensorboard", "false", "--lora.rank", "4",
            "--data.max_length", "64", "--train.max_steps", "5", "--train.save_every", "0"]
    env = {**os.environ, "LEANTUNE_FAULT": "backward:3:TERM", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "leantune.cli.main", *argv], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "terminated (SIGTERM) at step 2" in proc.stdout + proc.stderr
    assert (out / "checkpoints" / "step-000002").is_dir() and not (out / "leantune.lock").exists()


def test_ctrl_c_during_the_final_save_gives_a_resume_hint_and_resume_reports_the_losses(
        tiny_llama_dir, data, tmp_path, monkeypatch, reference):
    from leantune.train import loop

    def interrupt(run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "write_loss_svg", interrupt)  # after the last checkpoint and the adapter
    lines = []
    out = tmp_path / "final"
    res = run(make_cfg(tiny_llama_dir, data, out, save_every=0), console=lines.append)
    assert res.stopped == "interrupted"
    assert "--resume" in lines[-1] and "final save" in lines[-1]
    assert not (out / "summary.json").exists()  # not complete: nothing says it is
    monkeypatch.undo()
    res = run(make_cfg(tiny_llama_dir, data, out, save_every=0), resume=True, console=quiet)
    summary = json.loads((out / "summary.json").read_text())
    want = json.loads((reference / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 6
    assert summary["train_loss"] == pytest.approx(want["train_loss"], abs=1e-6)
    assert_same_adapter(out, reference)


def test_temporaries_of_a_dead_run_are_removed_at_the_next_start(tiny_llama_dir, data, tmp_path):
    out = tmp_path / "stale"
    (out / "checkpoints" / ".step-000002.x1y2.tmp").mkdir(parents=True)
    (out / "checkpoints" / ".step-000002.x1y2.tmp" / "optimizer.pt").write_bytes(b"half")
    (out / ".adapter.abcd.tmp").mkdir()
    (out / ".metrics.jsonl.qq.tmp").write_text("{")
    (out / "notes.txt").write_text("mine")  # not ours: kept
    lines = []
    run(make_cfg(tiny_llama_dir, data, out, max_steps=1, save_every=0), console=lines.append)
    assert not list(out.glob(".*.tmp")) and not list((out / "checkpoints").glob(".*"))
    assert (out / "notes.txt").read_text() == "mine"
    assert any(ln.startswith("note: removed 3 unfinished temporary") for ln in lines)


# ---------------------------------------------------------------------------------------------
# Non-finite loss: stop | skip_batch | rollback


def test_stop_names_the_likely_causes_and_keeps_the_checkpoint(tiny_llama_dir, data, tmp_path, monkeypatch):
    poison(monkeypatch, lambda n: n == 3, lambda loss: loss * float("inf"))
    out = tmp_path / "stop"
    with pytest.raises(TrainingError) as e:
        run(make_cfg(tiny_llama_dir, data, out), console=quiet)
    msg = str(e.value)
    assert "at step 3" in msg and "step-000002" in msg and "\n" not in msg
    assert "train.lr=0.003" in msg and "inspect-data" in msg and "on_nonfinite" in msg
    assert not (out / "summary.json").exists()


def test_skip_batch_drops_the_poisoned_step_and_finishes(tiny_llama_dir, data, tmp_path, monkeypatch):
    poison(monkeypatch, lambda n: n == 3, lambda loss: loss * float("nan"))
    out, lines = tmp_path / "skip", []
    res = run(make_cfg(tiny_llama_dir, data, out, on_nonfinite="skip_batch"), console=lines.append)
    assert res.stopped == "completed" and res.steps == 6
    assert any("skipped" in ln and "at step 3" in ln for ln in lines)
    recs = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["nonfinite"] for r in recs if "nonfinite" in r] == [1]
    state = json.loads((out / "checkpoints" / "step-000006" / "state.json").read_text())
    assert state["progress"]["batch_index"] == 7  # the poisoned batch was consumed, not retried
    assert all(torch.isfinite(t).all() for t in adapter(out).values())


def test_skip_batch_stops_past_the_cap(tiny_llama_dir, data, tmp_path, monkeypatch):
    poison(monkeypatch, lambda n: n >= 2, lambda loss: loss * float("nan"))
    with pytest.raises(TrainingError, match=r"3th non-finite step.*train.max_nonfinite 2"):
        run(make_cfg(tiny_llama_dir, data, tmp_path / "cap", on_nonfinite="skip_batch", max_nonfinite=2),
            console=quiet)


def test_rollback_reloads_the_last_checkpoint_and_goes_on(tiny_llama_dir, data, tmp_path, monkeypatch):
    from leantune.train import step as step_mod

    orig = step_mod.micro_batch_loss
    calls = {"n": 0}
    seen = []

    def hooked(model, batch, **kw):  # poison step 5; remember the weights steps 4 and 4-again start from
        calls["n"] += 1
        loss, n = orig(model, batch, **kw)
        if calls["n"] in (4, 6):
            seen.append({k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
        return (loss * float("nan") if calls["n"] == 5 else loss), n

    monkeypatch.setattr(step_mod, "micro_batch_loss", hooked)
    out, lines = tmp_path / "rb", []
    res = run(make_cfg(tiny_llama_dir, data, out, on_nonfinite="rollback", save_every=3, keep_checkpoints=0),
              console=lines.append)
    assert res.stopped == "completed" and res.steps == 6
    assert any("rolled back to step-000003" in ln for ln in lines)
    # after the rollback the run is back at step 3's weights: step 4 starts again from where it first did
    for k in seen[0]:
        assert torch.equal(seen[0][k], seen[1][k]), k
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(ln)]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4, 5, 6]  # no step logged twice


def test_rollback_without_a_checkpoint_says_what_to_set(tiny_llama_dir, data, tmp_path, monkeypatch):
    poison(monkeypatch, lambda n: n == 1, lambda loss: loss * float("nan"))
    with pytest.raises(TrainingError, match="rollback needs a checkpoint.*save_every"):
        run(make_cfg(tiny_llama_dir, data, tmp_path / "rb0", on_nonfinite="rollback"), console=quiet)


def test_fp16_on_a_bf16_model_is_named_first(tiny_llama):
    from leantune.train.faults import likely_causes

    tiny_llama.config.torch_dtype = torch.bfloat16
    assert likely_causes(tiny_llama.half(), 1e-3).startswith("fp16 on a model trained in bf16")
    assert likely_causes(tiny_llama.float(), 1e-3).startswith("a learning rate too high (train.lr=0.001; try 0.00025)")
