"""Option helpers shared by the subcommands that read a run config: one flag per config field, and
the flags given turned back into config overrides."""

from __future__ import annotations

import argparse


def _add_config_fields(p: argparse.ArgumentParser) -> None:
    """One flag per config field; the methods' sections are those registered, or for `--help` alone
    the light table of the built-in ones (cli/method_help.py), so help never waits for torch."""
    from .method_help import help_fields

    fields, section_titles = help_fields()
    groups: dict[str, argparse._ArgumentGroup] = {}
    titles = {"": "run", "data": "data (data.*)", "train": "training loop (train.*)",
              "galore": "GaLore optimizer (galore.*)", "quant": "quantized base, QLoRA (quant.*)",
              "distributed": "several processes under torchrun (distributed.*)", **section_titles}
    for name, tname, default, help in fields:
        section = name.split(".")[0] if "." in name else ""
        g = groups.get(section) or groups.setdefault(section, p.add_argument_group(titles.get(section, section)))
        flags = [f"--{name}"]
        if "_" in name:
            flags.append(f"--{name.replace('_', '-')}")
        default = "null" if default is None else default
        g.add_argument(*flags, dest=f"cfg:{name}", metavar=tname.upper().replace(" ", "_")
                       if "|" not in tname else "{" + tname.replace("|", ",") + "}",
                       default=argparse.SUPPRESS, help=f"{help} (default: {default})".replace("%", "%%"))


def _overrides(ns: argparse.Namespace) -> dict:
    import yaml

    from ..config import fields_of

    types = {fi.name: fi.type for fi in fields_of()}
    out = {}
    for k, v in vars(ns).items():
        if not k.startswith("cfg:"):
            continue
        name = k[4:]
        if types.get(name) in (str, str | None) and isinstance(v, str):
            # Text stays text: "You are #1" is no YAML comment and "no" no boolean.
            out[name] = None if v in ("null", "~") else v
            continue
        # Everything else reads as in the file: lists ([q_proj, v_proj]), null, numbers, booleans.
        try:
            out[name] = yaml.safe_load(v) if isinstance(v, str) else v
        except yaml.YAMLError:
            out[name] = v
    return out

