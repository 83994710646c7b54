"""Checksums of a folder's files: `manifest.json`, written last, lets a reader prove the folder is what
was written (a bit flip, a truncated copy or a file edited by hand shows as a mismatch).

    {"version": 1, "files": {"adapter_model.safetensors": {"sha256": "...", "bytes": 123}, ...}}
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .atomic import write_json

MANIFEST = "manifest.json"


def sha256(path: str | os.PathLike, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Checksum every file in `folder` (not in subfolders) into its manifest.json; call it last."""
    folder = Path(folder)
    files = {p.name: {"sha256": sha256(p), "bytes": p.stat().st_size}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    out = folder / MANIFEST
    write_json(out, {"version": 1, "files": files})
    return out


def verify_manifest(folder: str | os.PathLike) -> str | None:
    """None when every file the manifest lists is there with its size and checksum; else the first
    problem, in words. A folder without a manifest (written before manifests existed) is not checked."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
        items = sorted(files.items())
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        return f"{MANIFEST} is unreadable"
    for name, want in items:
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        if not isinstance(want, dict) or p.stat().st_size != want.get("bytes"):
            return f"{name} has {p.stat().st_size} bytes, the manifest says {want.get('bytes') if isinstance(want, dict) else '?'}"
        if sha256(p) != want.get("sha256"):
            return f"{name} does not match its checksum"
    return None
