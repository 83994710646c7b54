"""A model's shape from its config.json alone: exact parameter counts, and what each method trains.

The model is built on the meta device (shapes, no memory, no weights), so the counts are the real
module tree's, for any AutoConfig architecture transformers knows, not a formula per family. The
trainable set of an adapter method comes from attaching that method on the meta device through the
method registry (`METHODS[method].prepare`, adapters/base.py), the same call a run makes, full and freeze
included. So a new method or a changed target rule is planned the way it trains.
"""

from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import adapters  # noqa: F401  (importing the package registers every method)
from ..adapters.base import METHODS as REGISTRY, adapter_modules
from ..config import RunConfig
from ..errors import ConfigError
from ..models.load import resolve_source
from ..quant.loader import quantizable_linears

# The config fields the activation terms need; every AutoConfig decoder names them this way (text_config
# for multimodal wrappers is read instead of the wrapper).
NEEDED = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")

ADAPTER_METHODS = ("lora", "dora", "ia3", "bottleneck", "prompt", "prefix")
METHODS = ("full", "freeze", *ADAPTER_METHODS)

# Linear leaves that read the same input inside a layer: autograd saves that input once for all of them.
_INPUT_GROUPS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "qkv_proj": "attn_in",
                 "query_key_value": "attn_in", "Wqkv": "attn_in", "c_attn": "attn_in",
                 "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in", "w1": "mlp_in",
                 "w3": "mlp_in", "fc1": "mlp_in", "c_fc": "mlp_in", "dense_h_to_4h": "mlp_in"}


@dataclass
class Trainable:
    """What one method trains on this model: the count and the shape of every trainable tensor (the 8-bit
    optimizer, Adafactor and GaLore size their state per tensor)."""

    count: int
    shapes: list[tuple[int, ...]]
    adapted: list[tuple[str, int, int]] = field(default_factory=list)  # (leaf, in, out) per adapter of one layer
    extra_tokens: int = 0  # virtual tokens a prompt method puts in front of every row


@dataclass
class ModelShape:
    """The numbers the planner needs, all read from config.json and the meta-device module tree."""

    name: str
    model_type: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int           # per token: an MoE counts its active experts' width (experts_per_tok x moe width)
    vocab: int
    tied: bool
    total_params: int           # every parameter, tied ones once (as the published sizes count them)
    linear_params: int          # weights of the nn.Linear layers a 4/8-bit base quantizes (all but the head)
    linear_out_rows: int        # their output rows summed (LLM.int8 keeps one fp32 scale per row)
    linear_layers: int          # how many (each 4-bit layer keeps its own code tables)
    norm_params: int            # kept fp32 under a quantized base, as PEFT's prepare_model_for_kbit_training does
    experts: int = 1            # routed experts per MoE layer (1: dense); every expert is counted in the weights
    largest_linear: int = 0     # elements of the largest weight (export/merge work tensor by tensor)
    largest_quantized: int = 0  # elements of the largest weight a quantized base dequantizes per matmul
    trainable: dict[str, Trainable] = field(default_factory=dict)

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim


def read_config(source: str | Path):
    """An AutoConfig from a model folder, a config.json file, a hub id (config.json only) or a .gguf file."""
    from transformers import AutoConfig

    text = str(source)
    path = Path(text).expanduser()
    if path.is_file() and path.suffix == ".json":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ConfigError(f"cannot read {text}: {e}; pass a model's config.json") from None
        if not isinstance(raw, dict) or "model_type" not in raw:
            raise ConfigError(f"{text} has no model_type: it is not a transformers config.json; pass the model's own")
        kind = raw.pop("model_type")
        try:
            return AutoConfig.for_model(kind, **raw)
        except ValueError as e:
            raise ConfigError(f"{text}: transformers does not know model_type {kind!r} ({e}); upgrade transformers "
                              "or pass a supported model") from None
    resolved = resolve_source(text, need_weights=False)  # a hub id offline fails here with one line
    try:
        return AutoConfig.from_pretrained(resolved)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read the config of {text!r}: {str(e).splitlines()[0]}") from None


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _field(config, *names, default=None):
    for n in names:
        v = getattr(config, n, None)
        if v is not None:
            return v
    return default


@contextlib.contextmanager
def _quiet():
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


def _meta_model(config) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), _quiet():
        try:
            return AutoModelForCausalLM.from_config(config)
        except (ValueError, KeyError) as e:
            raise ConfigError(f"transformers cannot build a causal LM from this config ({str(e).splitlines()[0]}); "
                              "the planner needs an AutoModelForCausalLM architecture") from None


def _count(model: nn.Module, trainable_only: bool = False) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        n += p.numel()
    return n


def shape_of(config, name: str = "model") -> ModelShape:
    """The shape of `config` (an AutoConfig), counted on a meta-device instance."""
    text = _text_config(config)
    missing = [f for f in NEEDED if getattr(text, f, None) in (None, 0)]
    if missing:
        raise ConfigError(f"config of {name} lacks {', '.join(missing)}: the planner needs hidden_size, "
                          "num_hidden_layers, num_attention_heads and vocab_size; pass a decoder LM's config.json")
    model = _meta_model(config)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = [model.get_submodule(p) for p in quantizable_linears(model, keep=[head] if head is not None else [])]
    norms = sum(p.numel() for m in model.modules() if type(m).__name__.lower().endswith("norm")
                for p in m.parameters(recurse=False))
    hidden, heads = int(text.hidden_size), int(text.num_attention_heads)
    experts = int(_field(text, "num_local_experts", "num_experts", "n_routed_experts", default=1) or 1)
    per_tok = int(_field(text, "num_experts_per_tok", "moe_topk", default=1) or 1)
    inter = int(_field(text, "intermediate_size", "ffn_hidden_size", "n_inner", default=4 * hidden) or 4 * hidden)
    if experts > 1:  # activations follow the experts a token visits, weights count them all
        inter = int(_field(text, "moe_intermediate_size", default=inter)) * per_tok
    tied = bool(head is not None and head.weight is model.get_input_embeddings().weight)
    return ModelShape(
        name=name, model_type=str(getattr(text, "model_type", "?")), hidden=hidden,
        layers=int(text.num_hidden_layers), heads=heads,
        kv_heads=int(_field(text, "num_key_value_heads", default=heads) or heads),
        head_dim=int(_field(text, "head_dim", default=hidden // heads) or hidden // heads), intermediate=inter,
        vocab=int(text.vocab_size), tied=tied, total_params=_count(model),
        linear_params=sum(m.weight.numel() for m in linears), linear_out_rows=sum(m.out_features for m in linears),
        linear_layers=len(linears), norm_params=norms, experts=experts,
        largest_linear=max([m.weight.numel() for m in linears] + [head.weight.numel() if head is not None else 0]),
        largest_quantized=max([m.weight.numel() for m in linears], default=0))


def trainable_of(config, method: str, run_cfg=None) -> Trainable:
    """What `method` trains on this architecture with the sections of `run_cfg` (a RunConfig; defaults when
    None), found by attaching it to a meta-device model exactly as a run does."""
    cfg = run_cfg or RunConfig()
    model = _meta_model(config)
    # attach inside the meta context too: the adapters' own tensors (and DoRA's weight norms, prefix
    # tuning's cache probe) are then shapes only, ~1 s for a 70B model instead of minutes of real init.
    if method not in REGISTRY:
        raise ConfigError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    with torch.device("meta"), _quiet():
        registered = REGISTRY[method]
        registered.prepare(model, cfg.sections.get(registered.config_section))
    seen, shapes = set(), []
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            shapes.append(tuple(p.shape))
    adapted = []
    first = next((p for p in adapter_modules(model) if ".0." in p or p.endswith(".0")), None)
    if first is not None:
        prefix = first[: first.index(".0") + 2] + "."  # "model.layers.0."
        for path, adapter in adapter_modules(model).items():
            if path.startswith(prefix):  # a bottleneck wraps a whole sublayer: hidden in, hidden out
                base = adapter.base_layer
                hidden = int(_text_config(config).hidden_size)
                adapted.append((path.rsplit(".", 1)[-1], int(getattr(base, "in_features", hidden)),
                                int(getattr(base, "out_features", hidden))))
    extra = cfg.prompt.virtual_tokens if method == "prompt" else 0
    return Trainable(count=sum(int(torch.Size(s).numel()) for s in shapes), shapes=shapes, adapted=adapted,
                     extra_tokens=extra)


def input_group(leaf: str) -> str:
    """Which saved input a Linear leaf reads ("attn_in", "mlp_in"), or its own name when it shares none."""
    return _INPUT_GROUPS.get(leaf, leaf)
