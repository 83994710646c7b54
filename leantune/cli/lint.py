"""`leantune lint`: the deployment rules (checkpoint/deploy_rules.py) over adapters, runs or train configs,
and with --vllm-command the `vllm serve` line for the adapters (serve/vllm.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ConfigError


def _named(text: str) -> tuple[str, Path]:
    """NAME=PATH, or a path whose name (its run's, for a run's adapter/) names it."""
    name, sep, path = text.partition("=")
    if sep and name and not Path(text).exists():
        return name, Path(path)
    p = Path(text)
    folder = p.resolve()
    return (folder.parent.name if folder.name == "adapter" else folder.name), p


def _lint(source: Path, targets: tuple[str, ...]) -> tuple[str, list]:
    from ..checkpoint import deploy_rules

    if source.suffix in (".yaml", ".yml"):
        from .. import adapters  # noqa: F401  (a config's method sections register on import)
        from .. import config as config_mod

        return "config", deploy_rules.config_findings(config_mod.load(source, validate=False), targets)
    return "adapter", deploy_rules.lint_adapter(source, targets)


def main(ns: argparse.Namespace) -> int:
    from ..checkpoint.deploy_rules import TARGETS, errors

    named = [_named(s) for s in ns.sources]
    if ns.vllm_command:
        return _vllm_command(ns, named)
    targets = TARGETS if ns.target == "all" else (ns.target,)
    reports = []
    for _, path in named:
        kind, findings = _lint(path, targets)
        reports.append({"source": str(path), "kind": kind, "targets": list(targets),
                        "findings": [f.as_dict() for f in findings], "ok": not errors(findings)})
        if not ns.json:
            print(f"{path} ({', '.join(targets)}): " + ("ok" if not findings else
                  f"{len(errors(findings))} error(s), {len(findings) - len(errors(findings))} warning(s)"))
            for f in findings:
                print(f"  {f}")
    ok = all(r["ok"] for r in reports)
    if ns.json:
        print(json.dumps({"ok": ok, "sources": reports}, indent=1))
    return 0 if ok else 2


def _vllm_command(ns: argparse.Namespace, named: list[tuple[str, Path]]) -> int:
    from ..checkpoint.deploy_rules import errors
    from ..serve.vllm import command_line, handoff

    adapters: dict[str, Path] = {}
    for name, path in named:
        if path.suffix in (".yaml", ".yml"):
            raise ConfigError(f"--vllm-command serves saved adapters; {path} is a config: train it first")
        if name in adapters:
            raise ConfigError(f"two adapters are named {name!r}; name them apart with NAME=PATH")
        adapters[name] = path
    argv, findings = handoff(adapters, ns.base, max_loras=ns.max_loras, port=ns.port, host=ns.host)
    ok = not errors(findings)
    if ns.json:
        print(json.dumps({"ok": ok, "vllm_command": argv if ok else None,
                          "findings": [f.as_dict() for f in findings]}, indent=1))
        return 0 if ok else 2
    for f in findings:
        print(str(f), file=sys.stderr)
    if not ok:
        print("error: vLLM would refuse or mis-serve the adapters above; fix them, then ask for the command again",
              file=sys.stderr)
        return 2
    print(command_line(argv))
    return 0
