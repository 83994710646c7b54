"""Atomic writes: a file or folder either appears whole under its final name or not at all.

Each writer puts its bytes into a temporary sibling (same directory, so the same filesystem), flushes
and fsyncs it, then renames it over the final name: a crash or Ctrl-C at any moment leaves either the
old artifact or the new one, never half of one that looks complete.

The temporary file or folder is created private (0600/0700, tempfile's modes), and gets the mode a plain
write would have given it (0666/0777 less the umask) just before it is renamed into place: another user,
or a vLLM/Ollama service account, reads the adapter, the GGUF and the config as it would any other file.

A write that runs out of space (ENOSPC, or EDQUOT past a quota) removes its temporary and raises
`DiskFullError`, one line that names the disk and its free space; what was under the final name is untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import LeantuneError
from .faults import fault_point

NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(LeantuneError):
    """A write ran out of disk space (or quota); the message names the disk and what was kept."""


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes for this user on the filesystem that holds `path` (its nearest existing ancestor)."""
    here = Path(os.path.abspath(path))
    existing = next(p for p in (here, *here.parents) if p.exists())
    return shutil.disk_usage(existing).free


def _no_space(e: BaseException) -> bool:
    """A write failed for want of space: an OSError with that errno, our own error from a nested write,
    or a library's wrapper around it (torch.save and safetensors raise RuntimeError/SafetensorError
    whose text carries the OS message)."""
    if isinstance(e, DiskFullError) or (isinstance(e, OSError) and e.errno in NO_SPACE):
        return True
    return isinstance(e, Exception) and any(s in str(e) for s in ("No space left", "Disk quota exceeded"))


def disk_full(path: Path, e: BaseException | None = None) -> DiskFullError:
    """The one-line error for a write of `path` that found no space."""
    kept = f"the previous {path.name} is kept as it was" if path.exists() else f"nothing was written to {path}"
    why = "over the disk quota" if getattr(e, "errno", None) == errno.EDQUOT else "no space left"
    return DiskFullError(f"{why} on the disk holding {path.parent} ({free_bytes(path.parent) / 2**20:.0f} MiB free) "
                         f"while writing {path.name}; {kept}. Free space there or choose a folder on a larger disk")


def _umask() -> int:
    """The process umask. Linux shows it in /proc/self/status; elsewhere it is read by setting and
    restoring it, which is safe here because leantune writes from one thread."""
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is renamed to `path`.

    For writers that want a filename (safetensors, torch.save). On an exception the temporary file
    is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        fault_point("commit")
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _no_space(e):
            raise disk_full(path, e) from None
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` as a whole.

    Used for checkpoints and final adapters: a folder under its final name is always complete. If
    `path` already exists it is moved aside first and deleted only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        fault_point("commit")
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if _no_space(e):  # a file inside the folder ran out of space: name the folder, not the file
            raise disk_full(path, e) from None
        raise
