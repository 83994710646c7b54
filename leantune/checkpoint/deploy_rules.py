"""Deployment lint: will vLLM or llama.cpp serve this adapter (or the adapter this config will train)?

Pure rules over a PEFT adapter_config.json (a dict) and the tensor names and shapes of its
adapter_model.safetensors (read from the header alone), or over a training config before anything loads.
Each rule returns `Finding`s that name the conflicting option and the fix:

  error    the runtime refuses the adapter, or loads it and computes something else
  warning  it serves right only along the path the message names

The runtimes' rules, read from their source:
  vLLM 0.33   vllm/lora/peft_helper.py PEFTHelper (from_dict, _validate_features, validate_legal),
              vllm/config/lora.py MaxLoRARanks, vllm/lora/utils.py parse_fine_tuned_lora_name.
              Scaling alpha / r, or alpha / sqrt(r) with use_rslora; rank_pattern and alpha_pattern honoured.
  llama.cpp   convert_lora_to_gguf.py: only lora_A / lora_B (and lora_embedding_A / B) tensors, one
              adapter.lora.alpha per file (lora_alpha, written as it is); llama-adapter.cpp scales each pair by
              alpha / r with r read from the tensor's shape.
tests/parity/test_vllm_format.py checks these rules on leantune's adapters with a Llama's layer sizes too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from ..adapters.format import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from ..config import METHODS, RunConfig
from ..errors import ConfigError, ModelError
from .run_folder import RunFolder, is_run_folder

TARGETS = ("vllm", "llamacpp")
NAMES = {"vllm": "vLLM", "llamacpp": "llama.cpp"}
# vllm/config/lora.py MaxLoRARanks: the values --max-lora-rank takes.
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# peft_helper.py _init_is_supported: string inits that leave the base weights as they were.
SERVED_INITS = ("gaussian", "eva", "orthogonal", "mica", "lora_ga")
# PEFT features vLLM's _validate_features refuses, by config field.
VLLM_UNSUPPORTED = {"use_dora": "DoRA", "alora_invocation_tokens": "aLoRA", "layer_replication": "layer_replication",
                    "use_bdlora": "BD-LoRA", "use_qalora": "QA-LoRA"}
HEADS = ("classifier", "score")  # modules_to_save vLLM serves (classification heads)
Shapes = dict[str, tuple[int, ...]]  # tensor name -> shape, from the safetensors header


@dataclass(frozen=True)
class Finding:
    target: str           # vllm | llamacpp
    option: str           # the conflicting option: a config field (method, lora.rank, use_dora) or a tensor name
    message: str          # one line: what conflicts, then the fix
    severity: str = "error"

    def __str__(self) -> str:
        return f"{self.severity} [{self.target}] {self.option}: {self.message}"

    def as_dict(self) -> dict:
        return asdict(self)


def errors(findings: Iterable[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity == "error"]


def serve_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank that serves `rank`; None above vLLM's largest (512)."""
    return next((m for m in MAX_LORA_RANKS if m >= rank), None)


# ---------------------------------------------------------------------------------------------
# An adapter folder: adapter_config.json + the tensor names and shapes


def adapter_ranks(config: dict, shapes: Shapes | None = None) -> list[int]:
    """Every rank the adapter holds: r, rank_pattern's, and the rows of each lora_A in the file."""
    ranks = [config.get("r")] + list((config.get("rank_pattern") or {}).values())
    ranks += [shape[0] for name, shape in (shapes or {}).items() if name.endswith(".lora_A.weight") and shape]
    return [r for r in ranks if isinstance(r, int) and not isinstance(r, bool)]


def _base_changing_init(config: dict) -> str | None:
    init = config.get("init_lora_weights", True)
    return init if isinstance(init, str) and init.lower() not in SERVED_INITS else None


def _common(config: dict, target: str) -> list[Finding]:
    """What neither runtime serves: a non-LoRA adapter, base biases, saved whole modules, base-rewriting inits."""
    name, out = NAMES[target], []
    if config.get("peft_type") != "LORA":
        return [Finding(target, "peft_type", f"{name} serves LoRA adapters only, and this adapter's peft_type is "
                        f"{config.get('peft_type')}: merge it into its base (leantune merge) and serve the merged "
                        "model, or train method lora")]
    if config.get("bias", "none") != "none":
        out.append(Finding(target, "bias", f"bias={config['bias']!r} trains the base's biases, which {name} does not "
                           "load: train with bias none, or merge the adapter and serve the merged model"))
    saved = [m for m in config.get("modules_to_save") or [] if target != "vllm" or m not in HEADS]
    if saved:
        out.append(Finding(target, "modules_to_save", f"modules_to_save {saved} are whole trained modules, which "
                           f"{name} does not load from an adapter: drop modules_to_save, or merge the adapter and "
                           "serve the merged model"))
    if config.get("lora_bias"):
        out.append(Finding(target, "lora_bias", f"LoRA bias (lora_bias) is not served by {name}: train without "
                           "lora_bias, or merge the adapter"))
    init = _base_changing_init(config)
    if init:
        out.append(Finding(target, "init_lora_weights", f"init_lora_weights={init!r} changes the base weights, so the "
                           f"adapter does not fit the original base {name} loads: convert it in PEFT "
                           "(path_initial_model_for_weight_conversion) or merge it"))
    return out


def vllm_findings(config: dict, shapes: Shapes | None = None, max_lora_rank: int = MAX_LORA_RANKS[-1]) -> list[Finding]:
    """PEFTHelper's checks and the weight names parse_fine_tuned_lora_name accepts."""
    out = _common(config, "vllm")
    if config.get("peft_type") != "LORA":
        return out
    missing = sorted({"r", "lora_alpha", "target_modules"} - config.keys())
    if missing:
        return out + [Finding("vllm", missing[0], f"missing required field(s) {missing}; re-save the adapter with "
                              "PEFT or leantune")]
    alpha, targets = config["lora_alpha"], config["target_modules"]
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        out.append(Finding("vllm", "lora_alpha", f"lora_alpha must be a number, got {alpha!r}: the adapter config "
                           "is damaged; re-save it"))
    if not (isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))):
        out.append(Finding("vllm", "target_modules", f"target_modules must be a string or a list of strings, got "
                           f"{targets!r}: the adapter config is damaged; re-save it"))
    for field, what in VLLM_UNSUPPORTED.items():
        if config.get(field):
            fix = "use method lora" if field == "use_dora" else f"train without {field}"
            out.append(Finding("vllm", field, f"vLLM does not serve {what} adapters ({field}): {fix}, or merge the "
                               "adapter and serve the merged model"))
    bad = [r for r in [config["r"], *(config.get("rank_pattern") or {}).values()]
           if not isinstance(r, int) or isinstance(r, bool) or r <= 0]
    if bad:
        out.append(Finding("vllm", "r", f"LoRA rank must be a positive integer, got {bad[0]!r}: the adapter config "
                           "is damaged; re-save it"))
    top = max(adapter_ranks(config, shapes), default=0)
    if top > max_lora_rank and not bad:
        largest = max_lora_rank == MAX_LORA_RANKS[-1]
        fix = (f", the largest vLLM takes: retrain with lora.rank <= {max_lora_rank}, or merge the adapter" if largest
               else f": serve with --max-lora-rank {serve_rank(top)}")
        option = "rank_pattern" if top in (config.get("rank_pattern") or {}).values() else "r"
        out.append(Finding("vllm", option, f"LoRA rank {top} is greater than max_lora_rank {max_lora_rank}{fix}"))
    return out + _weight_findings(config, shapes, "vllm")


def llamacpp_findings(config: dict, shapes: Shapes | None = None) -> list[Finding]:
    """convert_lora_to_gguf.py's tensor names and llama.cpp's one-alpha, alpha / r convention."""
    out = _common(config, "llamacpp")
    if config.get("peft_type") != "LORA":
        return out
    if config.get("use_dora"):
        out.append(Finding("llamacpp", "use_dora", "a GGUF LoRA holds only lora_a/lora_b tensors, so llama.cpp has "
                           "no place for DoRA's magnitudes (use_dora): use method lora, or export the merged model "
                           "(leantune export RUN, without --adapter-only)"))
    for field in ("layer_replication", "use_bdlora", "use_qalora"):
        if config.get(field):
            out.append(Finding("llamacpp", field, f"llama.cpp's LoRA loader knows nothing of {field}: train without "
                               "it, or export the merged model (leantune export RUN)"))
    alpha = config.get("lora_alpha")
    others = sorted({a for a in (config.get("alpha_pattern") or {}).values() if a != alpha})
    if others:
        out.append(Finding("llamacpp", "alpha_pattern", f"alpha_pattern gives modules alphas {others} besides "
                           f"lora_alpha {alpha}, but a GGUF LoRA holds one adapter.lora.alpha: train with one alpha, "
                           "or export the merged model (leantune export RUN)"))
    if config.get("use_rslora"):
        ranks = sorted(set(adapter_ranks(config, shapes)))
        if len(ranks) > 1:
            out.append(Finding("llamacpp", "use_rslora", f"rsLoRA scales each module by alpha/sqrt(r), and with ranks "
                               f"{ranks} no single GGUF alpha (llama.cpp scales alpha/r) gives every module its "
                               "scale: train with one rank, or export the merged model (leantune export RUN)"))
        elif ranks:
            r = ranks[0]
            out.append(Finding("llamacpp", "use_rslora", f"rsLoRA scales by alpha/sqrt(r), llama.cpp by alpha/r, and "
                               f"convert_lora_to_gguf.py writes lora_alpha unchanged (a {1 / math.sqrt(r):.3g}x too "
                               "weak adapter): export it with `leantune export RUN --adapter-only`, which writes "
                               f"alpha*sqrt(r), or run llama.cpp with --lora-scaled FILE {math.sqrt(r):g}",
                               severity="warning"))
    return out + _weight_findings(config, shapes, "llamacpp")


# The tensor names both readers accept (after the base_model.model. prefix), and the factor each is.
FACTORS = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}


def _why(name: str, config: dict) -> tuple[str, bool]:
    """What a tensor that is no lora_A/lora_B is, and whether a config finding already names its cause."""
    if name.endswith("lora_magnitude_vector"):
        return "a DoRA magnitude (use_dora)", bool(config.get("use_dora"))
    if name.endswith(".bias"):
        return "a bias (lora_bias or bias)", bool(config.get("lora_bias")) or config.get("bias", "none") != "none"
    if name.endswith(".weight") and ".lora_" not in name:
        return "a whole weight (modules_to_save)", bool(config.get("modules_to_save"))
    return "not a LoRA A/B weight", False


def _weight_findings(config: dict, shapes: Shapes | None, target: str) -> list[Finding]:
    """Every tensor is a lora_A or lora_B (one finding per kind of stranger, naming the first, unless a config
    field already explains it), each A has its B, and A (r, in) and B (out, r) agree on r."""
    if shapes is None:
        return []
    name, out = NAMES[target], []
    strangers: dict[str, list[str]] = {}
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if target == "vllm" and key.removeprefix(PREFIX).split(".")[0] in HEADS:
            continue  # a saved classification head: vLLM takes it
        suffix = next((s for s in FACTORS if key.endswith(s)), None)
        if suffix is None:
            why, explained = _why(key, config)
            if not explained:
                strangers.setdefault(why, []).append(key)
        else:
            pairs.setdefault(key.removesuffix(suffix), {})[FACTORS[suffix]] = shape
    for why, keys in strangers.items():
        more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
        out.append(Finding(target, keys[0], f"{name} loads only lora_A/lora_B tensors; this one is {why}{more}: "
                           "re-save the adapter without it, or merge the adapter and serve the merged model"))
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            out.append(Finding(target, module, f"has lora_{next(iter(parts))} but not its partner: the file is "
                               "incomplete; re-save the adapter"))
        elif len(parts["A"]) != 2 or len(parts["B"]) != 2 or parts["A"][0] != parts["B"][1]:
            out.append(Finding(target, module, f"lora_A {parts['A']} and lora_B {parts['B']} do not share a rank "
                               "(A is (r, in), B (out, r)): the file is damaged; re-save the adapter"))
    return out


FINDERS: dict[str, Callable[..., list[Finding]]] = {"vllm": vllm_findings, "llamacpp": llamacpp_findings}


def adapter_findings(config: dict, shapes: Shapes | None, targets: Iterable[str] = TARGETS) -> list[Finding]:
    return [f for t in targets for f in FINDERS[t](config, shapes)]


def safetensors_shapes(path: Path) -> Shapes:
    """{name: shape} from a safetensors header (8 bytes of length, then JSON); no tensor is read."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise ModelError(f"{path} is not a readable safetensors file ({e}); re-save the adapter") from None
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def adapter_folder(source: str | Path) -> Path:
    """The adapter folder `source` names: itself, or a run folder's adapter/ (else its newest checkpoint)."""
    p = Path(source)
    if is_run_folder(p):
        run = RunFolder(p)
        if run.model.is_dir() and not run.adapter.is_dir():
            raise ConfigError(f"{p} is a full/freeze run: its model/ is a whole model, which vLLM and llama.cpp serve "
                              f"as a base (vllm serve {run.model}); there is no adapter to lint")
        p = run.adapter if run.adapter.is_dir() else next(reversed(run.checkpoints()), run.adapter)
    if not (p / CONFIG_NAME).is_file():
        raise ConfigError(f"{p} holds no {CONFIG_NAME}: pass an adapter folder, a run folder or a train config .yaml")
    return p


def read_adapter(folder: str | Path) -> tuple[dict, Shapes | None]:
    """(adapter_config.json, {tensor: shape} or None when the weights are a pickle we do not open)."""
    d = Path(folder)
    try:
        config = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {d / CONFIG_NAME} ({e}); re-save the adapter") from None
    if not isinstance(config, dict):
        raise ModelError(f"{d / CONFIG_NAME} is not a JSON object; re-save the adapter")
    weights = d / WEIGHTS_NAME
    if weights.is_file():
        return config, safetensors_shapes(weights)
    if any((d / n).is_file() for n in ("adapter_model.bin", "adapter_model.pt")):
        return config, None
    raise ModelError(f"{d} has {CONFIG_NAME} but no {WEIGHTS_NAME}: the adapter is incomplete; re-save it")


def lint_adapter(source: str | Path, targets: Iterable[str] = TARGETS) -> list[Finding]:
    config, shapes = read_adapter(adapter_folder(source))
    return adapter_findings(config, shapes, targets)


# ---------------------------------------------------------------------------------------------
# A training config, before anything loads (deploy_targets)


def config_findings(cfg: RunConfig, targets: Iterable[str] | None = None) -> list[Finding]:
    """The rules above, as they apply to what `cfg` will train: by the config's names (method, lora.*)."""
    out = []
    for target in cfg.deploy_targets if targets is None else targets:
        name, drop = NAMES[target], f"drop {target} from deploy_targets"
        method = METHODS[cfg.method]
        if method.whole_model:
            continue  # the run's output is a whole model: both serve it as a base
        if cfg.method == "dora":
            what = ("vLLM does not serve DoRA adapters" if target == "vllm" else
                    "llama.cpp's GGUF LoRA has no place for DoRA's magnitudes")
            out.append(Finding(target, "method", f"{what}: use method lora, or {drop} (a merged DoRA run serves as "
                               "a plain model: leantune merge / leantune export)"))
            continue
        if method.section != "lora":
            out.append(Finding(target, "method", f"{name} serves LoRA adapters only, not method {cfg.method}: use "
                               f"method lora, or {drop} (a merged run serves as a plain model: leantune merge / "
                               "leantune export)"))
            continue
        lora = cfg.lora
        if target == "vllm" and serve_rank(lora.rank) is None:
            out.append(Finding(target, "lora.rank", f"lora.rank {lora.rank} is above {MAX_LORA_RANKS[-1]}, vLLM's "
                               f"largest --max-lora-rank: use lora.rank <= {MAX_LORA_RANKS[-1]}, or {drop}"))
        if lora.init == "loftq":
            out.append(Finding(target, "lora.init", f"lora.init loftq fits the adapter to the quantization error of "
                               f"this 4-bit base, so on the base {name} loads it is wrong: use lora.init default, or "
                               f"{drop} and serve the merged model (leantune merge)"))
        if target == "llamacpp" and lora.rslora:
            out.append(Finding(target, "lora.rslora", "rsLoRA scales by alpha/sqrt(rank), llama.cpp by alpha/rank: "
                               "export the adapter with `leantune export RUN --adapter-only`, which writes the alpha "
                               "llama.cpp needs (llama.cpp's convert_lora_to_gguf.py does not)", severity="warning"))
    return out


def check_deploy_targets(cfg: RunConfig, console: Callable[[str], None] = print) -> None:
    """Refuse a run whose adapter a deploy target cannot serve (ConfigError, one line); print the warnings."""
    found = config_findings(cfg)
    for f in found:
        if f.severity != "error":
            console(f"note: {f.message}")
    bad = errors(found)
    if bad:
        more = f" ({len(bad) - 1} more: `leantune lint CONFIG` lists them)" if len(bad) > 1 else ""
        raise ConfigError(f"{bad[0].message}{more}")
