"""The io layer's fault handling: a full disk mid-write leaves the old file and one line; manifests catch
every kind of damage; the fault hook parses its spec and refuses an unknown point."""

from __future__ import annotations

import errno
import json

import pytest

from leantune.io import atomic, faults
from leantune.io.manifest import verify_manifest, write_manifest


def test_enospc_in_an_atomic_file_keeps_the_old_one(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    with pytest.raises(atomic.DiskFullError) as e:
        with atomic.atomic_path(path) as tmp:
            tmp.write_text("new, half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert path.read_text() == "old" and list(tmp_path.iterdir()) == [path]
    msg = str(e.value)
    assert msg.startswith(f"no space left on the disk holding {tmp_path}") and "previous config.yaml is kept" in msg


def test_a_quota_and_a_library_wrapped_enospc_are_the_same_error(tmp_path):
    with pytest.raises(atomic.DiskFullError, match="over the disk quota"):
        with atomic.atomic_dir(tmp_path / "out"):
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
    with pytest.raises(atomic.DiskFullError, match="nothing was written"):
        with atomic.atomic_dir(tmp_path / "out"):
            raise RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert list(tmp_path.iterdir()) == []


def test_other_errors_pass_through_untouched(tmp_path):
    with pytest.raises(PermissionError):
        with atomic.atomic_path(tmp_path / "f"):
            raise PermissionError(errno.EACCES, "denied")


@pytest.mark.parametrize("damage", ["edit", "truncate", "delete", "garble manifest", "fake size"])
def test_the_manifest_notices_every_kind_of_damage(tmp_path, damage):
    (tmp_path / "a.bin").write_bytes(b"\x00" * 100)
    (tmp_path / "b.json").write_text("{}")
    write_manifest(tmp_path)
    assert verify_manifest(tmp_path) is None
    if damage == "edit":
        (tmp_path / "a.bin").write_bytes(b"\x00" * 99 + b"\x01")
    elif damage == "truncate":
        (tmp_path / "a.bin").write_bytes(b"\x00" * 50)
    elif damage == "delete":
        (tmp_path / "b.json").unlink()
    elif damage == "garble manifest":
        (tmp_path / "manifest.json").write_text('{"files": [1, 2]')
    else:
        m = json.loads((tmp_path / "manifest.json").read_text())
        m["files"]["a.bin"] = "nonsense"
        (tmp_path / "manifest.json").write_text(json.dumps(m))
    assert verify_manifest(tmp_path)


def test_a_folder_without_a_manifest_is_not_checked(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"x")
    assert verify_manifest(tmp_path) is None


def test_fault_spec_parses_and_refuses_unknown_points():
    import signal

    assert faults._parse("backward:3:term") == ("backward", 3, signal.SIGTERM)
    assert faults._parse("commit") == ("commit", 1, signal.SIGKILL)
    assert faults._parse(None) is None
    with pytest.raises(ValueError, match="no fault point 'nowhere'"):
        faults._parse("nowhere:1")
