"""The `leantune` command: the table of subcommands, the parser and the dispatch.

Each subcommand's options (its `_add_<cmd>` builder) and its handler live in a module of their own
(cli/train.py, cli/export.py, cli/serve.py, ...); the flags shared by the config-reading ones are in
cli/options.py. Heavy libraries (torch, transformers) are imported only inside the handler that runs,
so `leantune --help` and `leantune train --help` answer at once.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import LeantuneError
from . import data, demo, export, generate, merge, plan, serve, train, ui
from .doctor import _add_doctor
from .lint import _add_lint
from .options import _add_config_fields, _overrides  # noqa: F401  (imported from here by tests and tools)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that point to the subcommand's own help and suggest its closest option."""

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # reported by the subcommand that was given them, so the hint is its --help and its options
            sub = next((a.choices.get(getattr(ns, a.dest, None)) for a in self._actions
                        if isinstance(a, argparse._SubParsersAction)), None)
            (sub or self).error(f"unrecognized arguments: {' '.join(extras)}")
        return ns

    def error(self, message: str):  # type: ignore[override]
        import difflib

        if message.startswith("unrecognized arguments:"):
            known = [o for a in self._actions for o in a.option_strings]
            for arg in message.split(":", 1)[1].split():
                close = difflib.get_close_matches(arg.split("=")[0], known, n=1)
                if close:
                    message += f" (did you mean {close[0]}?)"
                    break
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


SUBCOMMANDS = (train._add_train, generate._add_generate, merge._add_merge, demo._add_demo, data._add_inspect_data,
               data._add_preprocess, export._add_export, plan._add_plan, serve._add_serve, _add_lint, ui._add_ui,
               _add_doctor)  # in --help order


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="leantune",
        description="Lean, faithful fine-tuning of open LLMs: LoRA adapters that PEFT and vLLM load unchanged.",
        epilog="Run `leantune demo` first: it fine-tunes a small real model on this machine, offline.",
    )
    parser.add_argument("--version", action="version", version=f"leantune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


# The subcommands that read a run config: they need every method's section, which registers as the methods'
# files are imported (with torch). The others, and `leantune --help`, never pay that import.
CONFIG_COMMANDS = ("train", "inspect-data", "preprocess")


def _load_methods(argv: list[str]) -> None:
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in CONFIG_COMMANDS and not {"-h", "--help"} & set(argv):  # help reads the light table
        from .. import adapters  # noqa: F401  (registration happens on import)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _load_methods(argv)
    parser = build_parser()
    try:
        ns = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return int(e.code or 0)
    if ns.command is None:
        parser.print_help()
        return 0
    try:
        if ns.command == "train":
            return train._train(ns, argv)
        if ns.command == "generate":
            return generate._generate(ns)
        if ns.command == "merge":
            return merge._merge(ns)
        if ns.command == "demo":
            return demo._demo(ns)
        if ns.command == "inspect-data":
            return data._inspect(ns)
        if ns.command == "preprocess":
            return data._preprocess(ns)
        if ns.command == "export":
            return export._export(ns)
        if ns.command == "plan":
            return plan._plan(ns)
        if ns.command == "ui":
            return ui._ui(ns)
        if ns.command == "serve":
            return serve._serve(ns)
        if ns.command == "doctor":
            from .doctor import main as doctor_main

            return doctor_main(as_json=ns.json)
        if ns.command == "lint":
            from .lint import main as lint_main

            return lint_main(ns)
    except LeantuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # SIGTERM arrives as Terminated where train handles it (io/faults.py)
        from ..io.faults import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated

        print("terminated" if isinstance(e, Terminated) else "interrupted", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
