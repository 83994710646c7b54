"""Introspection: the schema as a flat list of (dotted name, type, default, help), which drives
`leantune train --help` and the command line's overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from .schema import METHODS, RunConfig, SECTIONS


@dataclass(frozen=True)
class FieldInfo:
    name: str  # dotted: "lora.rank"
    type: Any
    default: Any
    help: str


def method_help(infos=None) -> str:
    """The `method` field's help: every registered method (or those in `infos`) with its line and section."""
    infos = METHODS.values() if infos is None else infos
    lines = [f"{m.name} ({m.summary}{'; ' + m.section + '.*' if m.section else ''})" for m in infos]
    return "fine-tuning method: " + (", ".join(lines) or "none registered (import leantune.adapters)")


def _schema(cls: type) -> list[tuple[str, Any, Callable[[], Any], str]]:
    """(name, type, default factory, help) of each field of `cls` in order; for RunConfig the method field
    takes its choices from METHODS and the registered sections stand after `data`."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if cls is RunConfig and f.name == "sections":
            continue
        tp, help = hints[f.name], f.metadata.get("help", "")
        if cls is RunConfig and f.name == "method" and METHODS:
            tp, help = Literal[tuple(METHODS)], method_help()  # type: ignore[valid-type]
        make = (lambda v=f.default: v) if f.default is not dataclasses.MISSING else f.default_factory
        out.append((f.name, tp, make, help))
        if cls is RunConfig and f.name == "data":
            out += [(name, sec.cls, sec.cls, "") for name, sec in SECTIONS.items()]
    return out


def fields_of(cls: type = RunConfig, prefix: str = "") -> list[FieldInfo]:
    out: list[FieldInfo] = []
    for name, tp, make, help in _schema(cls):
        if dataclasses.is_dataclass(tp):
            out.extend(fields_of(tp, f"{prefix}{name}."))
        else:
            out.append(FieldInfo(prefix + name, tp, make(), help))
    return out


def section_title(name: str) -> str | None:
    """The `--help` group title a method section declares, if `name` is one."""
    sec = SECTIONS.get(name)
    return sec.title if sec is not None else None


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is list:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict or dataclasses.is_dataclass(tp):
        return "mapping"
    return getattr(tp, "__name__", str(tp))
