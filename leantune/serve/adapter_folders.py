"""Adapter folders as the server sees them: names it accepts, what a folder must hold to be served (checked
before any weight is loaded), its weights as read from disk, and the finished runs under a folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..adapters.format import CONFIG_NAME, read_config
from ..adapters.lora import lora_scaling
from ..checkpoint.peft_format import MAGNITUDE, read_lora
from ..checkpoint.run_folder import SUMMARY, find_model_and_adapter, is_run_folder, run_info
from ..data.tokenize import resolve_chat_template
from ..errors import ConfigError, ModelError
from ..quant import spec_of

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NOT_SERVED = {  # peft_type -> why it is refused, and what to do instead
    "IA3": "IA3 scales activations per adapter (not a low-rank delta); merge it with `leantune merge` and serve the result",
    "PROMPT_TUNING": "prompt tuning prepends virtual tokens, which would change every row's positions in a shared batch; "
                     "merge is impossible, serve it with `leantune generate` instead",
    "PREFIX_TUNING": "prefix tuning adds its own KV prefix per layer, which the shared batch cache does not carry; "
                     "serve it with `leantune generate` instead",
    "P_TUNING": "p-tuning prepends virtual tokens; serve it with `leantune generate` instead",
}


@dataclass
class AdapterFolder:
    """A served adapter by name: where it lives and how its run prompted the model."""

    name: str
    path: Path
    rank: int
    method: str                       # lora | dora
    chat_template: str | None         # the run's data.chat_template resolved (None: the base tokenizer's)
    system_prompt: str | None


@dataclass
class AdapterWeights:
    """{module path: (A (r, in), B (out, r), magnitude (out,) or None)} and the scale s."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    scaling: float


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return name


def describe_adapter(name: str, path: str | Path) -> AdapterFolder:
    """Check an adapter folder (or a run folder holding one) without loading weights: a one-line error names
    what is wrong (not an adapter, a method not served, a damaged config)."""
    check_name(name)
    p = Path(path)
    if is_run_folder(p):
        _, adapter = find_model_and_adapter(str(p))
        if adapter is None:
            raise ModelError(f"{p} holds a whole model (full/freeze tuning), not an adapter; serve it as the base")
        p = adapter
    if not (p / CONFIG_NAME).is_file():
        raise ModelError(f"{p} has no {CONFIG_NAME}: not an adapter folder (point at a run folder or its adapter/)")
    config = read_config(p)
    kind = config.get("peft_type")
    if kind in NOT_SERVED:
        raise ModelError(f"adapter {name!r} ({p}) is not served: {NOT_SERVED[kind]}")
    read_lora(p)   # the full check (config and tensor names), so a damaged folder fails here, not mid-request
    info = run_info(p)
    template = resolve_chat_template(None, info.chat_template) if info is not None and info.chat_template else None
    return AdapterFolder(name, p, int(config["r"]), "dora" if config.get("use_dora") else "lora", template,
                         info.system_prompt if info is not None else None)


def read_weights(folder: AdapterFolder) -> AdapterWeights:
    config, by_module = read_lora(folder.path)
    scaling = lora_scaling(int(config["r"]), config["lora_alpha"], bool(config.get("use_rslora", False)))
    return AdapterWeights({p: (f["lora_A"].float(), f["lora_B"].float(), f.get(MAGNITUDE))
                           for p, f in by_module.items()}, scaling)


def finished_runs(root: str | Path) -> dict[str, Path]:
    """{run name: run folder} for every finished run (summary.json written) directly under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--adapters {root}: no such folder; point it at the folder holding your run folders")
    return {d.name: d for d in sorted(root.iterdir())
            if d.is_dir() and is_run_folder(d) and (d / SUMMARY).is_file() and (d / "adapter").is_dir()}


def base_mismatch(model, folder: str | Path) -> str | None:
    """When the run `folder` belongs to trained over another base precision than `model` holds (a QLoRA run
    on a 16-bit server, a 16-bit run on a 4-bit one, nf4 vs fp4): one sentence saying so, else None."""
    info = run_info(str(folder))
    if info is None:
        return None
    q, spec = info.quant_config(), spec_of(model)
    trained = None if q is None or not q.bits else (8,) if q.bits == 8 else (4, q.type)
    held = None if spec is None else (8,) if spec.bits == 8 else (4, spec.type)
    if trained == held:
        return None
    say = lambda k: "16-bit" if k is None else "8-bit" if k == (8,) else f"4-bit {k[1]}"  # noqa: E731
    return (f"its run trained over a {say(trained)} base and this server holds a {say(held)} base, so its outputs "
            "differ slightly from the run's own generate (start a server with the run's --quant-bits to match)")
