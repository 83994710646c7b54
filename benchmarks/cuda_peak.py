"""Run a script (or `-m module`) and, at exit, append its torch.cuda.max_memory_allocated() to the file named
by $LEANTUNE_CUDA_PEAK_FILE. The benchmarks wrap both sides with it, so GPU peaks are read the same way
for leantune and for the peer, whatever each prints itself.

    LEANTUNE_CUDA_PEAK_FILE=peaks.txt python benchmarks/cuda_peak.py -m leantune.cli.main train ...
"""

import atexit
import os
import sys

from launch import run_command


def _report() -> None:
    if "torch" not in sys.modules:  # the command never used torch: nothing on a GPU to report
        return
    import torch

    path = os.environ.get("LEANTUNE_CUDA_PEAK_FILE")
    if path and torch.cuda.is_available() and torch.cuda.is_initialized():
        with open(path, "a") as f:
            f.write(f"{torch.cuda.max_memory_allocated()}\n")


if __name__ == "__main__":
    atexit.register(_report)
    run_command(sys.argv[1:])
