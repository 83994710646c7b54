"""The hand-off to vLLM: the exact `vllm serve` command for a set of adapters on one base, linted first.

    vllm serve BASE --host H --port P --enable-lora --lora-modules name=/abs/path ... \\
        --max-lora-rank R --max-loras N

R is the smallest value vLLM accepts (vllm/config/lora.py MaxLoRARanks) that is at least every adapter's
largest rank, rank_pattern's and the tensors' included: vLLM refuses a rank above --max-lora-rank when the
adapter loads, and sizes its LoRA buffers by R, so a larger R only costs memory. N defaults to the number of
adapters (vLLM's default is 1: one adapter per batch). Requests then pick an adapter by `"model": name`.
The rules each adapter is held to are checkpoint/deploy_rules.py's, for target vllm.
"""

from __future__ import annotations

import re
import shlex
import sys
from collections.abc import Mapping
from pathlib import Path

from ..checkpoint.deploy_rules import (MAX_LORA_RANKS, Finding, adapter_folder, adapter_ranks, errors, read_adapter,
                                       serve_rank, vllm_findings)
from ..checkpoint.run_folder import run_info
from ..errors import ConfigError

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]*")  # a model name a request can carry; no '=' or spaces


def handoff(adapters: Mapping[str, str | Path], base: str | None = None, *, max_loras: int | None = None,
            port: int = 8000, host: str = "127.0.0.1") -> tuple[list[str], list[Finding]]:
    """(the argv of `vllm serve` for `adapters` {model name: adapter or run folder} on `base`, the findings).

    `base` defaults to the base the adapters record (they must agree). Findings with severity error mean
    vLLM would refuse an adapter or serve it wrong; the command is built anyway, so it can be shown."""
    if not adapters:
        raise ConfigError("no adapters to hand to vLLM: name at least one adapter or run folder")
    findings, modules, ranks, bases = [], [], [], {}
    for name, source in adapters.items():
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"adapter name {name!r} cannot be a vLLM model name: use letters, digits and ._-:/, "
                              "starting with a letter or digit (NAME=PATH)")
        folder = adapter_folder(source)
        config, shapes = read_adapter(folder)
        findings += [Finding(f.target, f"{name}: {f.option}", f.message, f.severity)
                     for f in vllm_findings(config, shapes)]
        ranks.append(max(adapter_ranks(config, shapes), default=1))
        findings += quantized_base_findings(name, source)
        bases[name] = config.get("base_model_name_or_path")
        modules.append(f"{name}={folder.resolve()}")
    recorded = {b for b in bases.values() if b}
    if base is None:
        if len(recorded) != 1:
            what = f"different bases {sorted(recorded)}" if recorded else "no base"
            raise ConfigError(f"the adapters record {what}: pass the base model to serve them on (--base MODEL)")
        base = recorded.pop()
    for name, b in bases.items():
        if b and b != base:
            findings.append(Finding("vllm", f"{name}: base_model_name_or_path", f"adapter {name} was trained on {b}, "
                                    f"the command serves {base}: vLLM does not check, so make sure they are the same "
                                    "model", severity="warning"))
    if base in adapters:
        raise ConfigError(f"adapter name {base!r} is the base's own name, which requests use for no adapter; rename it")
    rank = serve_rank(max(ranks))
    if rank is None:  # vllm_findings already says which adapter is too large
        rank = MAX_LORA_RANKS[-1]
    n = len(adapters) if max_loras is None else max_loras
    if n < 1:
        raise ConfigError(f"--max-loras must be >= 1, got {n}")
    argv = ["vllm", "serve", str(base), "--host", host, "--port", str(port), "--enable-lora",
            "--lora-modules", *modules, "--max-lora-rank", str(rank), "--max-loras", str(n)]
    return argv, findings


def quantized_base_findings(name: str, source: str | Path) -> list[Finding]:
    """A QLoRA run's adapter: vLLM serves it over the 16-bit base (its core dropped bitsandbytes in 0.28), so its
    outputs differ slightly from the run's own `generate` and `leantune serve`, which use the 4/8-bit base."""
    info = run_info(str(source))
    q = info.quant_config() if info is not None else None
    if q is None or not q.bits:
        return []
    kind = "8-bit (LLM.int8)" if q.bits == 8 else f"4-bit {q.type}"
    return [Finding("vllm", f"{name}: quant.bits", f"run {name} trained over a {kind} base; the command serves it over "
                    "the 16-bit base (vLLM core has no bitsandbytes since 0.28; the out-of-tree vllm-bnb-plugin "
                    "loads one), so its outputs differ slightly from `leantune serve`, which uses the run's own base",
                    severity="warning")]


def command_line(argv: list[str]) -> str:
    """The argv as one shell line, quoted where needed."""
    return shlex.join(argv)


def print_handoff(argv: list[str], findings: list[Finding], otherwise: str) -> int:
    """The findings on stderr, then the command on stdout (exit 0), or, when vLLM would refuse or mis-serve
    an adapter, one error line ending in `otherwise` (exit 2)."""
    for f in findings:
        print(str(f), file=sys.stderr)
    if errors(findings):
        print(f"error: vLLM would refuse or mis-serve the adapters above; fix them, {otherwise}", file=sys.stderr)
        return 2
    print(command_line(argv))
    return 0
