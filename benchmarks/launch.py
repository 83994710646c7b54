"""Run the command a wrapper script was given, in this process: `-m module args...` or `script.py args...`.

The wrappers (cuda_peak.py, step_tokens.py) patch or hook something first, then hand over to the real
command here, so what they measure is that command's own process."""

from __future__ import annotations

import os
import runpy
import sys


def run_command(argv: list[str]) -> None:
    """argv: what followed the wrapper's own name (`-m leantune ...` or `path/to/script.py ...`)."""
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
        runpy.run_path(sys.argv[0], run_name="__main__")
