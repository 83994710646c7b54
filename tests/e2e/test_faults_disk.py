"""Integrity and disk faults: every checkpoint carries checksums, resume falls back past a damaged one;
an adapter that does not read back is never reported saved; a full disk (ENOSPC, injected, and a real
tmpfs where the test may mount one) keeps the previous checkpoint intact and ends with one line naming the
disk; free space is checked before each checkpoint."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import uuid

import pytest

from leantune.cli.main import main
from leantune.errors import TrainingError
from leantune.io.atomic import DiskFullError
from leantune.io.manifest import verify_manifest
from leantune.train.loop import run

from .test_faults import assert_same_adapter, data, reference  # noqa: F401  (fixtures)
from .test_loop_behaviour import make_cfg, quiet
from .test_train_cli import base_args


def ckpt(out, step):
    return out / "checkpoints" / f"step-{step:06d}"


def test_every_checkpoint_file_is_in_its_manifest(tiny_llama_dir, data, tmp_path):
    out = tmp_path / "m"
    run(make_cfg(tiny_llama_dir, data, out, max_steps=2, save_every=1, keep_checkpoints=0), console=quiet)
    for step in (1, 2):
        files = json.loads((ckpt(out, step) / "manifest.json").read_text())["files"]
        assert set(files) == {p.name for p in ckpt(out, step).iterdir()} - {"manifest.json"}
        assert verify_manifest(ckpt(out, step)) is None


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "delete"])
def test_resume_falls_back_past_a_damaged_checkpoint(tiny_llama_dir, data, tmp_path, reference, damage):  # noqa: F811
    out = tmp_path / "dmg"
    cfg = make_cfg(tiny_llama_dir, data, out, save_every=2, keep_checkpoints=0)
    run(cfg, stop_after=4, console=quiet)  # dies after step 4: checkpoints 2 and 4 on disk
    target = ckpt(out, 4) / ("trainable.safetensors" if damage != "truncate" else "optimizer.pt")
    raw = target.read_bytes()
    if damage == "flip a byte":
        target.write_bytes(raw[:-9] + bytes([raw[-9] ^ 0x01]) + raw[-8:])
    elif damage == "truncate":
        target.write_bytes(raw[: len(raw) // 2])
    else:
        target.unlink()
    lines = []
    res = run(make_cfg(tiny_llama_dir, data, out, save_every=2, keep_checkpoints=0), resume=True, console=lines.append)
    assert any(ln.startswith("warning: checkpoint step-000004 is damaged") for ln in lines), lines
    assert any("resuming from step-000002" in ln for ln in lines)
    assert (out / "checkpoints" / "step-000004.damaged").is_dir()  # kept for a look, out of the way
    assert res.steps == 6
    assert_same_adapter(out, reference)  # resumed from step 2 with nothing lost but time


def test_no_intact_checkpoint_is_one_line(tiny_llama_dir, data, tmp_path, capsys):
    out = tmp_path / "all-bad"
    run(make_cfg(tiny_llama_dir, data, out, save_every=2), stop_after=2, console=quiet)
    (ckpt(out, 2) / "state.json").write_text("{}")
    argv = base_args(tiny_llama_dir, data, out, "--train.max_steps", "6", "--resume")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no intact checkpoint") and len(err.splitlines()) == 1


def test_an_adapter_that_does_not_read_back_is_never_reported_saved(tiny_llama_dir, data, tmp_path, monkeypatch):
    from leantune.checkpoint import peft_format

    orig = peft_format.save_safetensors

    def truncated(tensors, path, metadata=None):  # a write that "succeeds" but leaves half a file
        orig(tensors, path, metadata)
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[: len(raw) // 2])

    monkeypatch.setattr(peft_format, "save_safetensors", truncated)
    out = tmp_path / "trunc"
    with pytest.raises(TrainingError, match="does not read back.*adapter_model.safetensors"):
        run(make_cfg(tiny_llama_dir, data, out, max_steps=2, save_every=1), console=quiet)
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").iterdir())
    assert not (out / "adapter").exists() and not (out / "summary.json").exists()


def test_enospc_mid_checkpoint_keeps_the_previous_one_and_names_the_disk(tiny_llama_dir, data, tmp_path,
                                                                          monkeypatch, capsys):
    from leantune.train import state

    orig, calls = state.torch.save, {"n": 0}

    def full(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's optimizer state
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return orig(obj, f, *a, **k)

    monkeypatch.setattr(state.torch, "save", full)
    out = tmp_path / "full"
    assert main(base_args(tiny_llama_dir, data, out, "--train.max_steps", "6", "--train.save_every", "2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: no space left on the disk holding")
    assert str(out / "checkpoints") in err and "MiB free" in err and "step-000002, is intact" in err
    assert verify_manifest(ckpt(out, 2)) is None and (ckpt(out, 2) / "manifest.json").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]  # no temporary left


def test_free_space_is_checked_before_each_checkpoint(tiny_llama_dir, data, tmp_path, monkeypatch):
    from leantune.train import state

    real, calls = state.free_bytes, {"n": 0}

    def shrinking(path):
        calls["n"] += 1
        return real(path) if calls["n"] == 1 else 1000  # room for the first checkpoint only

    monkeypatch.setattr(state, "free_bytes", shrinking)
    out = tmp_path / "space"
    with pytest.raises(DiskFullError, match=r"0.0 MiB free and the next checkpoint needs about .*step-000002"):
        run(make_cfg(tiny_llama_dir, data, out, save_every=2), console=quiet)
    assert verify_manifest(ckpt(out, 2)) is None and not ckpt(out, 4).exists()


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 1 MiB tmpfs (needs root and a kernel that lets this container mount one; skipped otherwise)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("this machine does not let the test mount a tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_real_full_disk_keeps_the_previous_checkpoint(tiny_llama_dir, data, tmp_path, tiny_tmpfs, monkeypatch, capsys):
    from leantune.train import setup, state

    orig = setup.save_checkpoint
    monkeypatch.setattr(state, "check_space", lambda *a: None)  # let the write itself meet the full disk

    def then_fill(run_dir, *a, **k):
        path = orig(run_dir, *a, **k)
        filler = tiny_tmpfs / "filler"
        if not filler.exists():  # after the first checkpoint: leave 8 KiB, less than a checkpoint
            free = shutil.disk_usage(tiny_tmpfs).free
            filler.write_bytes(b"\0" * max(free - 8192, 0))
        return path

    monkeypatch.setattr(setup, "save_checkpoint", then_fill)
    out = tiny_tmpfs / "run"
    code = main(base_args(tiny_llama_dir, data, out, "--train.max_steps", "6", "--train.save_every", "2"))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "no space left on the disk holding" in err
    assert verify_manifest(ckpt(out, 2)) is None
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
