"""Imports go one way: every `leantune` import, at the top of a file or inside a function, points down the
layer table below, never up and never sideways into a peer, and no package or file imports itself round
in a circle.

The table is the architecture: a new package (serve, plan, eval, ui, ...) gets a row here or this test
fails. Peers in one tier do not import each other; a package that needs another moves above it.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

import leantune

# Lowest first. A package may import its own modules and any package in a lower tier.
TIERS: list[tuple[str, ...]] = [
    ("errors", "assets"),                # errors; the demo's data files (its script imports nothing of ours)
    ("config", "device", "io", "ops"),   # the run's schema; device/dtype policy; atomic files; pure tensor math
    ("quant",),                          # quantized base layers and the quant settings (bitsandbytes)
    ("adapters",),                       # one file per fine-tuning method; adapters use quantized bases
    ("models", "checkpoint"),            # loading HF models; adapter formats and the run folder
    ("data",),                           # records, formats, tokenizing, packing
    ("train",),                          # the training loop and what it needs
    ("infer", "eval"),                   # generation; scoring a model against another
    ("merge", "export", "serve", "plan", "demo"),  # things a user does with a run
    ("ui",),                             # the local web page: a face the CLI's `leantune ui` starts
    ("cli",),                            # faces: parse, validate, call the library
    ("__main__",),                       # `python -m leantune` (what torchrun starts): the CLI's main
]
FACES = ("ui", "cli")  # only these may import leantune lazily (`leantune --help` stays fast: test_cli_fast.py)
TIER = {name: i for i, names in enumerate(TIERS) for name in names}

ROOT = Path(leantune.__file__).parent


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> list[tuple[str, str, int, bool]]:
    """(importing module, imported module, line, inside a function) for every import of the package by itself."""
    pkg = root.name
    found = []
    for path in sorted(root.rglob("*.py")):
        mod = module_name(path, root)
        here = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        tree = ast.parse(path.read_text(encoding="utf-8"))
        in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                       for n in ast.walk(f)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1] + [node.module or ""]) if node.level else node.module
                base = base.rstrip(".")
                # `from . import fidelity` imports a module; `from .gguf import write_gguf` a name of one
                subs = [f"{base}.{a.name}" for a in node.names
                        if (root.parent / f"{base}.{a.name}".replace(".", "/")).with_suffix(".py").is_file()
                        or (root.parent / f"{base}.{a.name}".replace(".", "/")).is_dir()]
                targets = subs or [base]
            else:
                continue
            for t in targets:
                if t == pkg or t.startswith(pkg + "."):
                    found.append((mod, t, node.lineno, id(node) in in_function))
    return found


def top_name(module: str) -> str:
    """The row of the table a module belongs to: `leantune.train.loop` -> train; the package root -> errors."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "errors"  # leantune/__init__.py holds only __version__


def violations(root: Path, tier: dict[str, int], faces: tuple[str, ...]) -> list[str]:
    found = imports(root)
    problems = []
    names = {top_name(module_name(p, root)) for p in root.rglob("*.py")}
    problems += [f"leantune/{n} has no row in the layer table (tests/unit/test_layers.py TIERS)"
                 for n in sorted(names - set(tier))]
    by_package: dict[str, set[str]] = defaultdict(set)
    by_module: dict[str, set[str]] = defaultdict(set)
    for src, dst, line, lazy in found:
        a, b = top_name(src), top_name(dst)
        where = f"{src.replace('.', '/')}.py:{line} imports {dst}"
        if a != b and a in tier and b in tier and tier[b] >= tier[a]:
            kind = "a peer" if tier[b] == tier[a] else "a higher layer"
            problems.append(f"{where}: {b} is {kind} of {a}")
        if lazy and a not in faces:
            problems.append(f"{where} inside a function: imports below the CLI go at the top of the file")
        if a != b:
            by_package[a].add(b)
        if src != dst:
            by_module[src].add(dst)
    problems += [f"package cycle: {' -> '.join(c)}" for c in cycles(by_package)]
    problems += [f"file cycle: {' -> '.join(c)}" for c in cycles(by_module)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one member (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(n: str) -> None:
        index[n] = low[n] = len(index)
        stack.append(n)
        for m in graph.get(n, ()):
            if m not in index:
                visit(m)
                low[n] = min(low[n], low[m])
            elif m in stack:
                low[n] = min(low[n], index[m])
        if low[n] == index[n]:
            comp = []
            while (m := stack.pop()) != n:
                comp.append(m)
            if comp:
                found.append(sorted([n, *comp]))

    for n in sorted(graph):
        if n not in index:
            visit(n)
    return found


def test_imports_go_down_the_layer_table_without_cycles():
    problems = violations(ROOT, TIER, FACES)
    assert not problems, "\n".join(problems)


def test_the_check_sees_imports_inside_functions():
    lazy = [(src, dst) for src, dst, _, inside in imports(ROOT) if inside]
    assert lazy and all(top_name(src) in FACES for src, _ in lazy)  # the CLI's lazy imports are found


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("files, expected", [
    ({"low/__init__.py": "", "low/a.py": "from ..high import b\n", "high/__init__.py": "", "high/b.py": ""},
     "high is a higher layer of low"),
    ({"low/__init__.py": "", "low/a.py": "def f():\n    from ..peer.b import x\n", "peer/__init__.py": "",
      "peer/b.py": "x = 1\n"}, "peer is a peer of low"),
    ({"low/__init__.py": "", "low/a.py": "def f():\n    from . import b\n", "low/b.py": ""},
     "inside a function"),
    ({"low/__init__.py": "", "low/a.py": "from .b import y\n", "low/b.py": "from .a import x\n"},
     "file cycle: pkg.low.a -> pkg.low.b"),
    ({"low/__init__.py": "", "high/__init__.py": "", "high/a.py": "from ..low import b\n",
      "low/b.py": "import pkg.high.a\n"}, "package cycle: high -> low"),
    ({"new/__init__.py": ""}, "leantune/new has no row"),
])
def test_the_check_fails_on_each_kind_of_violation(tmp_path, files, expected):
    _write(tmp_path / "pkg", {"__init__.py": "", **files})
    tier = {"errors": 0, "low": 1, "peer": 1, "high": 2}
    problems = violations(tmp_path / "pkg", tier, faces=())
    assert any(expected in p for p in problems), problems
