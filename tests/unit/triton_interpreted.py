"""The Triton kernel modules, run by Triton's CPU interpreter.

Triton reads TRITON_INTERPRET when it decorates a kernel (its own tl.* helpers at its import, ours at theirs)
and again when one runs, so the variable is set for the process before triton's first import. A process that
imported triton without it (a GPU session running the whole suite) skips these tests."""

import importlib
import os
import sys
import types

import pytest

MODULES = ("leantune.ops.triton.cross_entropy", "leantune.ops.triton.rmsnorm", "leantune.ops.triton.swiglu")


def kernels() -> types.SimpleNamespace:
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported in this process without TRITON_INTERPRET=1", allow_module_level=True)
    ce, rms, sw = (importlib.import_module(m) for m in MODULES)
    if type(ce._ce_rows).__name__ != "InterpretedFunction":
        pytest.skip("the Triton kernels were imported without TRITON_INTERPRET=1", allow_module_level=True)
    return types.SimpleNamespace(ce_rows=ce.ce_rows, cross_entropy=ce.cross_entropy, rms_norm=rms.rms_norm,
                                 swiglu=sw.swiglu)
