"""One process at a time in a folder: a lock file holding the owner's pid and host.

Two `leantune train` on one output_dir would interleave checkpoints and logs and each report a run that
neither finished. The lock file is created with O_EXCL (so two starting at once cannot both win), holds
"pid host", and is removed when the owner ends. A lock whose process is gone (kill -9, a crash, a reboot)
is stale: the next run takes it over and says so. A lock from another host cannot be checked from here and
is refused with the file to delete.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from ..errors import ConfigError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _owner(path: Path) -> tuple[int, str] | None:
    """(pid, host) written in the lock file, or None when it is unreadable or torn."""
    try:
        pid, host = path.read_text(encoding="utf-8").split()[:2]
        return int(pid), host
    except (OSError, ValueError):
        return None


def acquire(path: Path, what: str, console: Callable[[str], None] = print) -> None:
    """Create the lock file at `path` for this process, taking over a stale one; `what` names the folder
    in messages. Raises ConfigError while a live process holds it."""
    me = f"{os.getpid()} {socket.gethostname()}\n"
    for _ in range(2):  # at most one stale takeover
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            owner = _owner(path)
            if owner is not None and owner[1] != socket.gethostname():
                raise ConfigError(f"{what} is locked by a run on host {owner[1]} (pid {owner[0]}); if that run is "
                                  f"over, delete {path}") from None
            if owner is not None and _alive(owner[0]):
                raise ConfigError(f"{what} is in use by a running leantune process (pid {owner[0]}); wait for it to "
                                  "end, or choose another output_dir") from None
            console(f"note: {what} was locked by a process that is no longer running "
                    f"({'pid ' + str(owner[0]) if owner else 'unreadable lock'}); taking the lock over")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(me)
        return
    raise ConfigError(f"{what}: another process took the lock at the same moment; try again")


def release(path: Path) -> None:
    """Remove the lock file if this process holds it."""
    owner = _owner(path)
    if owner is not None and owner[0] == os.getpid():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def held(path: Path, what: str, console: Callable[[str], None] = print) -> Iterator[None]:
    """Hold the lock for the body. A folder made only to hold the lock is removed again if the body left it
    empty (a run refused before writing anything leaves no folder behind)."""
    created = not path.parent.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        acquire(path, what, console)
        try:
            yield
        finally:
            release(path)
    finally:
        if created:
            with contextlib.suppress(OSError):  # not empty (the run wrote something), or already gone
                path.parent.rmdir()
