"""tests/gpu is skipped where there is no CUDA (CI, every CPU machine), so nothing there would notice when a
name it imports from leantune moves. This test resolves every leantune import of those files here, so the
GPU suite cannot rot between the sessions that have a GPU (one did: LoraConfig moved to adapters/lora.py)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

GPU_TESTS = sorted((Path(__file__).resolve().parents[1] / "gpu").glob("test_*.py"))


def leantune_imports(path: Path) -> list[tuple[str, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("leantune")
            for alias in node.names]


@pytest.mark.parametrize("path", GPU_TESTS, ids=lambda p: p.name)
def test_every_leantune_name_the_gpu_suite_imports_exists(path):
    imports = leantune_imports(path)
    assert imports, f"{path.name} imports nothing from leantune: is this check still reading it?"
    for module, name in imports:
        assert hasattr(importlib.import_module(module), name), f"{path.name}: {module} has no {name}"
