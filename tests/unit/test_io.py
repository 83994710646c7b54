"""Atomic writes leave files and folders with the modes a plain write gives them (the umask decides), so
another user or a serving account (vLLM, Ollama) can read the adapter, the GGUF and the config."""

from __future__ import annotations

import os
import stat

import pytest

from leantune.io.atomic import atomic_dir, atomic_path, save_safetensors, write_json, write_text


@pytest.fixture(params=[0o022, 0o077, 0o002], ids=["022", "077", "002"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_files_and_folders_get_the_modes_of_a_plain_write(tmp_path, umask):
    import torch

    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain-dir").mkdir()
    write_text(tmp_path / "a.txt", "x")
    write_json(tmp_path / "config.json", {"a": 1})
    save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    with atomic_path(tmp_path / "model.gguf") as tmp:
        tmp.write_bytes(b"GGUF")
    with atomic_dir(tmp_path / "adapter") as tmp:
        write_json(tmp / "adapter_config.json", {})
        (tmp / "by-a-library.bin").write_bytes(b"")
    expected_file, expected_dir = 0o666 & ~umask, 0o777 & ~umask
    assert mode(tmp_path / "plain.txt") == expected_file and mode(tmp_path / "plain-dir") == expected_dir
    for name in ("a.txt", "config.json", "w.safetensors", "model.gguf", "adapter/adapter_config.json",
                 "adapter/by-a-library.bin"):
        assert mode(tmp_path / name) == expected_file, (name, oct(mode(tmp_path / name)))
    assert mode(tmp_path / "adapter") == expected_dir


def test_a_failed_write_leaves_nothing_behind(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "adapter") as tmp:
            write_json(tmp / "adapter_config.json", {})
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
