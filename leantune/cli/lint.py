"""`leantune lint`: the deployment rules (checkpoint/deploy_rules.py) over adapters, runs or train configs,
and with --vllm-command the `vllm serve` line for the adapters (serve/vllm.py)."""

from __future__ import annotations

import argparse
import json
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
    from ..serve.vllm import handoff, print_handoff

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
    return print_handoff(argv, findings, "then ask for the command again")


def _add_lint(sub) -> None:
    p = sub.add_parser("lint", help="check an adapter, a run or a train config against vLLM's and llama.cpp's rules",
                       description="Checks what vLLM and llama.cpp refuse or serve wrong (DoRA, modules_to_save,\n"
                       "biases, base-rewriting inits, ranks above 512, one GGUF alpha per file), reading only\n"
                       "adapter_config.json and the safetensors header. A train config is checked as its\n"
                       "deploy_targets are before training. Exit 0: no errors (warnings are printed);\n"
                       "2: errors, each naming the conflicting option and the fix.",
                       epilog="examples:\n  leantune lint runs/first                      # vLLM and llama.cpp\n"
                       "  leantune lint runs/first/adapter --target vllm --json\n"
                       "  leantune lint my.yaml --target llamacpp      # before training\n"
                       "  leantune lint legal=runs/legal support=runs/support --vllm-command   # the vllm serve line",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="+", metavar="SOURCE", help="an adapter folder, a run folder or a train config "
                   ".yaml; NAME=PATH names an adapter for --vllm-command (default: the folder's name)")
    p.add_argument("--target", choices=["vllm", "llamacpp", "all"], default="all", help="the runtime (default: all)")
    p.add_argument("--json", action="store_true", help="the findings as JSON")
    p.add_argument("--vllm-command", action="store_true", help="print the `vllm serve` command that serves these "
                   "adapters on their base (--max-lora-rank from their ranks); refused while an adapter has errors")
    p.add_argument("--base", help="--vllm-command: the base model (default: the one the adapters record)")
    p.add_argument("--max-loras", type=int, help="--vllm-command: adapters in one batch (default: all of them)")
    p.add_argument("--host", default="127.0.0.1", help="--vllm-command: the address vLLM binds (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="--vllm-command: the port (default: 8000)")
