"""Run a script (or `-m module`) and, at exit, append its torch.cuda.max_memory_allocated() to the file named
by $LEANTUNE_CUDA_PEAK_FILE. The benchmarks wrap both sides with it, so GPU peaks are read the same way
for leantune and for the peer, whatever each prints itself.

    LEANTUNE_CUDA_PEAK_FILE=peaks.txt python benchmarks/cuda_peak.py -m leantune.cli.main train ...
"""

import atexit
import os
import runpy
import sys


def _report() -> None:
    import torch

    path = os.environ.get("LEANTUNE_CUDA_PEAK_FILE")
    if path and torch.cuda.is_available() and torch.cuda.is_initialized():
        with open(path, "a") as f:
            f.write(f"{torch.cuda.max_memory_allocated()}\n")


if __name__ == "__main__":
    atexit.register(_report)
    if sys.argv[1] == "-m":
        sys.argv = sys.argv[2:]
        runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
    else:
        sys.argv = sys.argv[1:]
        sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))
        runpy.run_path(sys.argv[0], run_name="__main__")
