"""The config on disk: reading a YAML file (paths in it relative to it) and writing a run's config.yaml."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .schema import METHODS, RunConfig
from .validate import from_dict


def load_yaml(path: str | Path) -> dict:
    import yaml

    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {str(p)!r} does not exist; create one (see README: 'A five-minute tour')")
    if p.is_dir():
        raise ConfigError(f"{str(p)!r} is a folder; pass the YAML config file inside it")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p} is not valid YAML{where}: {getattr(e, 'problem', e)}; fix the syntax there") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{p} is not UTF-8 text; save the config as UTF-8 YAML") from None
    if raw is None:
        raise ConfigError(f"{p} is empty; it needs at least `model:` and `data: {{path: ...}}`")
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a YAML mapping (key: value lines), not a {type(raw).__name__}")
    return raw


def load(path: str | Path | None, overrides: dict[str, Any] | None = None, validate: bool = True) -> RunConfig:
    raw = load_yaml(path) if path is not None else {}
    if path is not None:
        base = Path(path).resolve().parent
        _resolve_relative(raw, base)
    return from_dict(raw, overrides, validate=validate)


def _resolve_relative(raw: dict, base: Path) -> None:
    """Input paths written in the file are read relative to the file when they exist there
    (output_dir stays relative to the working directory, like every other tool's)."""

    def fix(value: Any) -> Any:
        if isinstance(value, str) and value and not Path(value).is_absolute():
            candidate = base / value
            if candidate.exists():
                return str(candidate)
        return value

    if "model" in raw:
        raw["model"] = fix(raw["model"])
    data = raw.get("data")
    if isinstance(data, dict):
        for k in ("path", "eval_path", "chat_template"):
            if k in data:
                data[k] = [fix(v) for v in data[k]] if isinstance(data[k], list) else fix(data[k])
        if isinstance(data.get("sources"), list):
            data["sources"] = [fix(s) if isinstance(s, str) else s for s in data["sources"]]
            for source in data["sources"]:
                if isinstance(source, dict) and "path" in source:
                    source["path"] = fix(source["path"])


def to_dict(cfg: Any) -> dict:
    """The config as plain data, in the order of `--help`: the core sections, then the section of the method
    the run uses as a top-level key (DoRA's is `lora`; full fine-tuning has none).

    Only that one: every other registered method's section holds defaults the run never reads, and a method
    registered at run time (a plugin, the contract tests' toy) would otherwise leave its section in every
    later run's config.yaml, which a process without that plugin (merge, export) then refuses as unknown.
    Loading the file back fills the absent sections with their defaults, so it round-trips."""
    if not isinstance(cfg, RunConfig):
        return dataclasses.asdict(cfg)
    info = METHODS.get(cfg.method)
    used = set(cfg.sections) if info is None else {info.section}  # an unregistered method: keep all, lose nothing
    out = {}
    for f in dataclasses.fields(cfg):
        if f.name == "sections":
            continue
        value = getattr(cfg, f.name)
        out[f.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        if f.name == "data":
            out.update({name: dataclasses.asdict(sec) for name, sec in cfg.sections.items() if name in used})
    return out


def dump_yaml(cfg: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
