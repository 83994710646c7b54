"""The methods' part of `leantune train --help` without importing them.

Each method's config section is declared in its own file (leantune/adapters/), and importing those files
imports torch: seconds, for a help text. So `train --help` reads the built-in methods' fields from a
table written from the registry, leantune/assets/method_help.json, and the real parse of a `train`
command imports the registry itself. A test (tests/contract/test_method_help.py) fails when the table
and the registry differ; `python -m leantune.cli.method_help` rewrites the table. A method registered
from outside leantune (imported before `main()` is called) shows in the help from the live registry.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..config import METHODS, SECTIONS, MethodInfo, fields_of, method_help, type_name

TABLE = Path(__file__).resolve().parents[1] / "assets" / "method_help.json"


def live_table() -> dict:
    """The table as the registry says it now, for the methods shipped with leantune."""
    from ..adapters.base import METHODS as CLASSES  # the faces may import lazily: torch, only to write the table

    builtin = [c for c in CLASSES.values() if c.__module__.startswith("leantune.")]
    infos = [MethodInfo(c.method, c.config_section, c.summary, c.whole_model) for c in builtin]
    fields = [{"name": "method", "type": "|".join(c.method for c in builtin), "default": "lora", "help": method_help(infos)}]
    titles = {}
    for c in builtin:
        if "config_cls" in c.__dict__ and c.config_cls is not None:
            titles[c.config_section] = SECTIONS[c.config_section].title
            fields += [{"name": fi.name, "type": type_name(fi.type), "default": fi.default, "help": fi.help}
                       for fi in fields_of(c.config_cls, f"{c.config_section}.")]
    return {"fields": fields, "titles": titles}


def help_fields() -> tuple[list[tuple], dict[str, str]]:
    """([(name, type name, default, help)] of every config field, {section: title}) for `--help`: the live
    registry when methods are registered, else the generic fields with the table's spliced in."""
    live = [(fi.name, type_name(fi.type), fi.default, fi.help) for fi in fields_of()]
    if METHODS or not TABLE.is_file():
        return live, {name: sec.title for name, sec in SECTIONS.items()}
    table = json.loads(TABLE.read_text(encoding="utf-8"))
    rows = [(f["name"], f["type"], f["default"], f["help"]) for f in table["fields"]]
    method, sections = rows[0], rows[1:]
    out = [method if name == "method" else (name, tp, default, help) for name, tp, default, help in live]
    after_data = max(i for i, row in enumerate(out) if row[0].startswith("data.")) + 1
    return out[:after_data] + sections + out[after_data:], table["titles"]


def write_table() -> None:
    TABLE.write_text(json.dumps(live_table(), indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":  # pragma: no cover
    write_table()
    print(f"wrote {TABLE}")
