"""The training loop's promises: deterministic, NaN stops with the last good checkpoint kept, Ctrl-C
saves a resumable checkpoint, early stopping, gradient checkpointing changes memory, not results."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from leantune.config import from_dict
from leantune.errors import TrainingError
from leantune.train.loop import run

from .test_train_cli import write_chat_data


def quiet(_):
    pass


def make_cfg(model_dir, data, out, **train):
    t = {"max_steps": 6, "batch_size": 2, "lr": 3e-3, "progress": False, "tensorboard": False,
         "save_every": 2, "eval_every": 0, **train}
    return from_dict({"model": str(model_dir), "output_dir": str(out), "dtype": "fp32",
                      "data": {"path": str(data), "max_length": 64},
                      "lora": {"rank": 4, "alpha": 8, "dropout": 0.1}, "train": t})


def adapter(run_dir):
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


@pytest.fixture
def data(tmp_path):
    return write_chat_data(tmp_path / "d.jsonl", n=24)


def test_same_seed_same_adapter(tiny_llama_dir, data, tmp_path):
    run(make_cfg(tiny_llama_dir, data, tmp_path / "a"), console=quiet)
    run(make_cfg(tiny_llama_dir, data, tmp_path / "b"), console=quiet)
    a, b = adapter(tmp_path / "a"), adapter(tmp_path / "b")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_llama_dir, data, tmp_path, monkeypatch):
    from leantune.train import step as step_mod

    calls = {"n": 0}
    orig = step_mod.micro_batch_loss

    def poisoned(model, batch, **kw):
        calls["n"] += 1
        loss, n = orig(model, batch, **kw)
        return (loss * float("nan") if calls["n"] > 5 else loss), n  # step 6 goes NaN (1 micro-batch/step)

    monkeypatch.setattr(step_mod, "micro_batch_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match=r"nan at step 6.*step-000004.*train.lr"):
        run(make_cfg(tiny_llama_dir, data, out, max_steps=10), console=quiet)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts[-1] == "step-000004"
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_ctrl_c_saves_a_checkpoint_that_resumes(tiny_llama_dir, data, tmp_path, monkeypatch):
    from leantune.train import step as step_mod

    orig = step_mod.micro_batch_loss
    calls = {"n": 0}

    def interrupt(model, batch, **kw):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return orig(model, batch, **kw)

    monkeypatch.setattr(step_mod, "micro_batch_loss", interrupt)
    out = tmp_path / "int"
    res = run(make_cfg(tiny_llama_dir, data, out, save_every=0), console=quiet)
    assert res.stopped == "interrupted" and res.steps == 3
    assert (out / "checkpoints" / "step-000003" / "adapter_model.safetensors").exists()
    monkeypatch.setattr(step_mod, "micro_batch_loss", orig)
    res = run(make_cfg(tiny_llama_dir, data, out, save_every=0), resume=True, console=quiet)
    assert res.stopped == "completed" and res.steps == 6
    run(make_cfg(tiny_llama_dir, data, tmp_path / "ref", save_every=0), console=quiet)
    a, b = adapter(out), adapter(tmp_path / "ref")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_early_stopping_after_patience_evaluations(tiny_llama_dir, data, tmp_path, monkeypatch):
    from leantune.train import step as step_mod

    losses = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0, 3.1, 3.2])
    monkeypatch.setattr(step_mod, "evaluate", lambda *a, **k: {"eval_loss": next(losses), "eval_ppl": 1.0,
                                                                "eval_tokens": 1})
    out = tmp_path / "es"
    res = run(make_cfg(tiny_llama_dir, data, out, max_steps=10, eval_every=1, early_stopping_patience=2),
              console=quiet)
    assert res.stopped == "early_stopped" and res.steps == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "early_stopped" and summary["best_eval_loss"] == 2.0
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def test_gradient_checkpointing_gives_the_same_training(tiny_llama_dir, data, tmp_path):
    run(make_cfg(tiny_llama_dir, data, tmp_path / "plain", max_steps=3), console=quiet)
    run(make_cfg(tiny_llama_dir, data, tmp_path / "ckpt", max_steps=3, gradient_checkpointing=True), console=quiet)
    a, b = adapter(tmp_path / "plain"), adapter(tmp_path / "ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_ctrl_c_during_evaluation_keeps_the_finished_step(tiny_llama_dir, data, tmp_path, monkeypatch):
    """The step's update is done when evaluation starts: the checkpoint must be that step's, so a
    resume neither repeats nor skips a batch."""
    from leantune.train import step as step_mod

    orig = step_mod.evaluate
    calls = {"n": 0}

    def interrupt(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return orig(*a, **k)

    monkeypatch.setattr(step_mod, "evaluate", interrupt)
    out = tmp_path / "int-eval"
    res = run(make_cfg(tiny_llama_dir, data, out, save_every=0, eval_every=1), console=quiet)
    assert res.stopped == "interrupted" and res.steps == 2
    monkeypatch.setattr(step_mod, "evaluate", orig)
    run(make_cfg(tiny_llama_dir, data, out, save_every=0, eval_every=1), resume=True, console=quiet)
    run(make_cfg(tiny_llama_dir, data, tmp_path / "ref", save_every=0, eval_every=1), console=quiet)
    a, b = adapter(out), adapter(tmp_path / "ref")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_the_step_is_normalised_by_the_global_token_count(tiny_llama_dir, data, tmp_path, monkeypatch):
    """distributed.global_token_count is the one normaliser of a step's loss (the all-reduce point
    under torchrun): a count twice as large halves the loss and counts twice the tokens."""
    from leantune.train import loop

    def first_step(out):
        run(make_cfg(tiny_llama_dir, data, out, max_steps=1, save_every=0), console=quiet)
        return next(m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m)

    one = first_step(tmp_path / "one")
    monkeypatch.setattr(loop, "global_token_count", lambda n: 2 * n)  # as if a second process had as many
    two = first_step(tmp_path / "two")
    assert two["label_tokens"] == 2 * one["label_tokens"]
    assert two["loss"] == pytest.approx(one["loss"] / 2, rel=1e-6)
