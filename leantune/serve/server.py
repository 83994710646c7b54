"""`leantune serve`: from what the user points at to a running server.

    leantune serve BASE --adapters runs/        every finished run under runs/ is a model name (its folder name)
    leantune serve runs/a runs/b                 each run (or adapter folder, or NAME=PATH) by name; the base
                                                 is the one their adapters name

An adapter that fails its checks is refused with its reason and the server starts with the others.

The base is quantized as the runs served trained over it (QLoRA: NF4/FP4, LLM.int8), by the loader training
used, or as --quant-bits / --quant-type say (`base_quant`); the start-up line says which and why.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..adapters.format import CONFIG_NAME
from ..checkpoint.run_folder import find_model_and_adapter, is_run_folder, run_info
from ..config import QuantConfig
from ..device import pick_dtype, resolve_device
from ..errors import ConfigError, LeantuneError, first_line
from ..infer.materialize import run_tokenizer
from ..models.load import check_vocab, load_model
from ..models.quantized import saved_quantization
from ..quant import spec_of
from .api import Limits, build_app, env_api_key, port_free
from .engine import Engine, check_name, finished_runs
from .vllm import handoff, print_handoff


@dataclass
class Plan:
    """What to serve: one base, adapters by name (name -> folder)."""

    base: str
    adapters: dict[str, Path] = field(default_factory=dict)
    adapter_root: Path | None = None


def adapter_name(path: Path) -> str:
    """A run's folder name (runs/legal/adapter -> legal), else the adapter folder's own name."""
    p = path.resolve()
    return p.parent.name if p.name == "adapter" and is_run_folder(p.parent) else p.name


def plan(sources: list[str], adapters_dir: str | None = None, base: str | None = None) -> Plan:
    found: dict[str, Path] = {}
    bases: dict[str, str] = {}   # base -> the source that named it
    for src in sources:
        name, _, path = src.partition("=") if "=" in src and not Path(src).exists() else ("", "", src)
        p = Path(path)
        if is_run_folder(p) or (p / CONFIG_NAME).is_file():
            model, adapter = find_model_and_adapter(str(p))
            if adapter is None:   # a full/freeze run: its model/ is a base
                bases.setdefault(model, src)
                continue
            name = check_name(name or adapter_name(p))
            if name in found:
                raise ConfigError(f"two adapters would be named {name!r}; name one with NAME=PATH")
            found[name] = p
            bases.setdefault(model, src)
        else:
            bases.setdefault(path, src)
    root = None
    if adapters_dir is not None:
        root = Path(adapters_dir)
        runs = finished_runs(root)
        if not runs:
            print(f"note: no finished run under {root} (a run is finished once it wrote summary.json); "
                  "adapters can still be loaded at run time with /v1/load_lora_adapter", file=sys.stderr)
        for name, run in runs.items():
            found.setdefault(name, run)
    if base is not None:
        chosen = base
    elif len(bases) == 1:
        chosen = next(iter(bases))
    elif not bases and found:
        chosen = find_model_and_adapter(str(next(iter(found.values()))))[0]
    elif not bases:
        raise ConfigError("nothing to serve: name a base model, run folders, or --adapters DIR")
    else:
        raise ConfigError(f"the sources name {len(bases)} different bases ({', '.join(bases)}); one server serves "
                          "one base: pass --base MODEL, or start one server per base")
    return Plan(chosen, found, root)


@dataclass
class BaseQuant:
    """How the base is held: `quant` (None: in --dtype) and why, for the start-up line."""

    quant: QuantConfig | None
    why: str


def describe_quant(q: QuantConfig | None) -> str:
    if q is None or not q.bits:
        return "16-bit"
    return "8-bit (LLM.int8)" if q.bits == 8 else f"4-bit {q.type}{', double quant' if q.double_quant else ''}"


def _quant_key(q: QuantConfig) -> tuple:
    return (8,) if q.bits == 8 else (4, q.type, q.double_quant, q.blocksize)


def base_quant(p: Plan, bits: str | None = None, quant_type: str | None = None) -> BaseQuant:
    """The quantization to serve the base in: --quant-bits (4, 8 or none) when given, else that of the runs
    served (every run that records one must agree), else none. --quant-type picks the 4-bit code."""
    runs = {name: info for name, path in p.adapters.items() if (info := run_info(path)) is not None}
    quantized = {name: q for name, info in runs.items() if (q := info.quant_config()) is not None and q.bits}
    if bits == "8" and quant_type is not None:
        raise ConfigError("--quant-type picks the 4-bit code (nf4 or fp4); drop it with --quant-bits 8")
    if bits == "none":
        if quant_type is not None:
            raise ConfigError("--quant-type needs a 4-bit base; drop it with --quant-bits none")
        if (saved := saved_quantization(p.base)) is not None:
            raise ConfigError(f"the base {p.base} is saved quantized ({saved.get('quant_method')}); --quant-bits none "
                              "needs the unquantized model: pass it with --base")
        return BaseQuant(None, "--quant-bits none" + (f" (the runs {', '.join(quantized)} trained over a quantized "
                                                      "base: their outputs differ slightly)" if quantized else ""))
    if bits is not None:
        like = next((q for q in quantized.values() if q.bits == int(bits)), QuantConfig(bits=int(bits)))
        q = dataclasses.replace(like, type=quant_type or like.type)
        return BaseQuant(q, f"--quant-bits {bits}")
    if not quantized:
        if quant_type is not None:
            raise ConfigError("--quant-type needs --quant-bits 4 (no run served here trained over a 4-bit base)")
        return BaseQuant(None, "")
    kinds = {_quant_key(q) for q in quantized.values()}
    sixteen = [name for name in runs if name not in quantized]
    if len(kinds) > 1 or sixteen:
        trained = ", ".join(f"{name}: {describe_quant(q)}" for name, q in quantized.items())
        trained += "".join(f", {name}: 16-bit" for name in sixteen)
        raise ConfigError(f"the runs served trained over different bases ({trained}); one server holds one base: pass "
                          "--quant-bits 4, 8 or none to pick it (or start one server per base)")
    q = next(iter(quantized.values()))
    if quant_type is not None and quant_type != q.type:
        return BaseQuant(dataclasses.replace(q, type=quant_type), f"--quant-type {quant_type}; the runs trained "
                         f"over {describe_quant(q)}")
    return BaseQuant(q, f"as {'run' if len(quantized) == 1 else 'runs'} {', '.join(quantized)} trained over it "
                     "(QLoRA); --quant-bits none serves a 16-bit base")


class _SayOnce(logging.Filter):
    """bitsandbytes logs a warning on every 8-bit matmul whose input is not fp16 (every decode step here)."""

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "MatMul8bitLt: inputs will be cast" not in record.getMessage():
            return True
        said, self.said = self.said, True
        return not said


def load_engine(p: Plan, *, max_loras: int, max_cpu_loras: int | None, max_batch: int, dtype: str = "auto",
                device: str = "auto", quant: BaseQuant | None = None):
    """The base loaded once (quantized as `quant` says: the loader training uses); each adapter checked and
    registered (a failing one is skipped with its reason)."""
    dev = resolve_device(device)
    info = run_info(p.base)
    tok = run_tokenizer(p.base, info)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    quant = quant or BaseQuant(None, "")
    model = load_model(p.base, dtype=pick_dtype(dtype, dev), device=dev, quant=quant.quant,
                       trust_remote_code=bool(info and info.trust_remote_code))
    spec = spec_of(model)
    if spec is not None:
        held = describe_quant(QuantConfig(bits=spec.bits, type=spec.type, double_quant=spec.double_quant))
        print(f"base: {held} through bitsandbytes, {quant.why or 'as saved'}", file=sys.stderr)
        if spec.bits == 8:
            logging.getLogger("bitsandbytes.autograd._functions").addFilter(_SayOnce())
    elif quant.why:
        print(f"base: 16-bit, {quant.why}", file=sys.stderr)
    check_vocab(model, tok)
    engine = Engine(model, tok, max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_batch=max_batch)
    for name, path in p.adapters.items():
        try:
            a = engine.add_adapter(name, path)
            print(f"adapter {name}: {a.method} r={a.rank} from {a.path}", file=sys.stderr)
        except LeantuneError as e:
            print(f"refused adapter {name}: {first_line(e)}", file=sys.stderr)
    return engine


def base_name(p: Plan, served_name: str | None) -> str:
    """The model name that means "no adapter": --served-model-name, else the base as given (vLLM's rule)."""
    return served_name or p.base


def print_vllm(p: Plan, ns) -> int:
    """--engine vllm: the `vllm serve` command for the same adapters and base, after the deployment lint
    (checkpoint/deploy_rules.py); exit 2 when vLLM would refuse or mis-serve an adapter."""
    if not p.adapters:
        raise ConfigError("--engine vllm hands adapters to vLLM: name at least one run or adapter folder")
    argv, findings = handoff(p.adapters, p.base, max_loras=ns.max_loras, port=ns.port, host=ns.host)
    return print_handoff(argv, findings, "or serve with --engine leantune")


def serve(ns) -> int:
    """The CLI entry: plan, check the port, load, run uvicorn until Ctrl-C."""
    p = plan(ns.sources, ns.adapters, ns.base)
    if ns.engine == "vllm":
        return print_vllm(p, ns)
    port_free(ns.host, ns.port)       # before the minutes of loading, not after
    quant = base_quant(p, ns.quant_bits, ns.quant_type)     # before the minutes of loading too
    engine = load_engine(p, max_loras=ns.max_loras, max_cpu_loras=ns.max_cpu_loras, max_batch=ns.max_batch,
                         dtype=ns.dtype, device=ns.device, quant=quant)
    name = base_name(p, ns.served_model_name)
    if name in engine.adapters:
        raise ConfigError(f"an adapter is named {name!r} like the base; rename it or pass --served-model-name")
    api_key = ns.api_key or env_api_key()
    app = build_app(engine, name, api_key=api_key, adapter_root=p.adapter_root,
                    limits=Limits(max_tokens=ns.max_tokens, max_request_bytes=ns.max_request_bytes,
                                  max_concurrent=ns.max_concurrent))
    import uvicorn

    if ns.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: listening on {ns.host} without --api-key: anyone who reaches this port can use it",
              file=sys.stderr)
    models = ", ".join([name, *engine.adapters])
    print(f"serving {models} on http://{ns.host}:{ns.port}/v1 (Ctrl-C stops)", file=sys.stderr)
    engine.start()
    try:
        uvicorn.run(app, host=ns.host, port=ns.port, log_level=ns.log_level)
    finally:
        engine.stop()
    return 0
