"""Where a command may write its output: never over the user's own files.

A folder output (a merged model) is refused when it exists and is not empty, unless the caller passes
`overwrite`, and even then only when everything in it was written by leantune: each output folder
carries a manifest (`.leantune-output.json`) of the files leantune put there, and a folder holding
anything else is never replaced. A file output (a GGUF) that exists is replaced only with `overwrite`.
The current folder, a folder above it and a folder holding a source are refused outright, and so is a
place that cannot be written: one line each, before any work starts.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError

MANIFEST = ".leantune-output.json"


def check_output_dir(out: str | os.PathLike, *, overwrite: bool = False, sources: Iterable[str | os.PathLike] = (),
                     flag: str = "--out") -> Path:
    """Refuse an output folder that would destroy something (see the module docstring); return it."""
    path = Path(out).expanduser()
    where = path.resolve()
    here = Path.cwd().resolve()
    if where == here or where in here.parents:
        raise ConfigError(f"{flag} {out} is the folder you are in (or above it); name a new folder, e.g. {flag} merged/NAME")
    for src in sources:
        s = Path(src).expanduser().resolve()
        if where == s or where in s.parents:
            raise ConfigError(f"{flag} {out} holds the source {src}; writing there would replace it: name a new folder")
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {out} is a file; name a folder to write the model to")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ConfigError(f"{flag} {out} already exists and is not empty; pass --overwrite to replace an earlier "
                              "leantune output, or name a new folder")
        foreign = sorted(set(_files(path)) - written_by_leantune(path))
        if foreign:
            shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
            raise ConfigError(f"{flag} {out} holds files leantune did not write ({shown}); leantune never deletes "
                              "them: name a new folder, or move them out first")
    _check_writable(path, flag, out)
    return path


def check_output_file(out: str | os.PathLike, *, overwrite: bool = False, flag: str = "--out") -> Path:
    """Refuse an output file that exists (unless `overwrite`), that is a folder, or cannot be written."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise ConfigError(f"{flag} {out} is a folder; name the file to write, e.g. {flag} {path / 'model.gguf'}")
    if path.exists() and not overwrite:
        raise ConfigError(f"{flag} {out} already exists; pass --overwrite to replace it, or name a new file")
    _check_writable(path, flag, out)
    return path


def write_manifest(folder: str | os.PathLike) -> None:
    """Record every file now in `folder` as leantune's (call it on the finished temporary folder)."""
    folder = Path(folder)
    files = sorted(f for f in _files(folder) if f != MANIFEST)
    (folder / MANIFEST).write_text(json.dumps({"written_by": "leantune", "files": files}, indent=1) + "\n",
                                   encoding="utf-8")


def written_by_leantune(folder: Path) -> set[str]:
    try:
        listed = json.loads((folder / MANIFEST).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {str(f) for f in listed} | {MANIFEST}


def _files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()]


def _check_writable(path: Path, flag: str, out) -> None:
    """The nearest existing folder at or above the output's parent must be writable: that is where it goes."""
    probe = path.parent.resolve()
    while not probe.exists():
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(probe)
        tempfile.TemporaryDirectory(prefix=".leantune-probe.", dir=probe).cleanup()  # os.access says yes to root
    except OSError:
        raise ConfigError(f"cannot write {flag} {out}: {probe} is not writable; choose a folder you can write to") from None
