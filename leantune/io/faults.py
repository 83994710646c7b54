"""Named fault points: where the tests kill, stop or interrupt a real process to prove what survives.

`LEANTUNE_FAULT=POINT:N[:SIGNAL]` makes the Nth time the process passes `fault_point(POINT)` send itself
SIGNAL (KILL unless named: KILL, TERM or INT). The points, in the order a run passes them:

  forward  backward  optimizer  log  eval  checkpoint  final  commit

`commit` is every atomic write (io/atomic.py) just before its rename, in train, merge and export alike.
Unset, a fault point costs one comparison: the variable is read once, at import.

SIGTERM is a fault of its own (preemption): `sigterm_as_interrupt()` turns it into Ctrl-C's path.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

POINTS = ("forward", "backward", "optimizer", "log", "eval", "checkpoint", "final", "commit")


def _parse(spec: str | None) -> tuple[str, int, int] | None:
    if not spec:
        return None
    name, _, rest = spec.partition(":")
    count, _, sig = rest.partition(":")
    if name not in POINTS:
        raise ValueError(f"LEANTUNE_FAULT names no fault point {name!r}; one of {', '.join(POINTS)}")
    return name, int(count or 1), getattr(signal, f"SIG{(sig or 'KILL').upper()}")


_SPEC = _parse(os.environ.get("LEANTUNE_FAULT"))
_seen = {p: 0 for p in POINTS}


def fault_point(name: str) -> None:
    """Pass the point `name`; when LEANTUNE_FAULT names it and this is its Nth pass, send the signal."""
    if _SPEC is None or _SPEC[0] != name:
        return
    _seen[name] += 1
    if _seen[name] == _SPEC[1]:
        os.kill(os.getpid(), _SPEC[2])


class Terminated(KeyboardInterrupt):
    """SIGTERM (SLURM's preemption, Kubernetes' pod deletion, `kill`): handled as Ctrl-C is, then the
    process exits with 143 (128 + 15) instead of Ctrl-C's 130, so a scheduler can tell them apart."""


EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While inside, SIGTERM raises `Terminated` where the process is, as SIGINT raises KeyboardInterrupt.
    Python lets only the main thread set a handler; elsewhere SIGTERM keeps its default."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
