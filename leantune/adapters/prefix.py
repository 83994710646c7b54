"""Prefix tuning (Li & Liang 2021, https://arxiv.org/abs/2101.00190): n trainable key/value vectors in
front of every layer's attention, delivered as a pre-filled cache (past_key_values).

    P: (n, L * 2 * kv_dim)      kv_dim = key/value heads * head_dim (grouped-query attention: the kv width)
    P -> (L * 2, B, kv_heads, n, head_dim) -> per layer (keys, values): the cache the model attends to

Every real token attends to the n prefix positions; the real tokens sit at positions n..n+T-1, as
after a prompt of n tokens. With `projection` (the paper's reparameterisation, PEFT's
prefix_projection), P is produced by an MLP from n smaller embeddings, which trains more stably:
P = W2 tanh(W1 E + b1) + b2, E: (n, kv_dim); only the result P is saved (the MLP is a training aid).

The adapter wraps the input embedding (passed through unchanged) and adds the cache in
`extend_inputs`, the hook the train step and generate call. The model must read past_key_values in
its attention: `inject_prefix` checks that with a one-token forward before anything trains. This is
PEFT 0.21.2's PrefixEncoder and causal-LM forward (peft/tuners/prefix_tuning/model.py,
peft/peft_model.py get_prompt), kept exact to it for Llama-style models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import need, option
from ..errors import ConfigError, ModelError
from .base import Adapter, set_module
from .prompt import _input_embedding_path


@dataclass
class PrefixConfig:
    """The `prefix:` section."""

    virtual_tokens: int = option(20, "key/value prefix length in every layer (the paper uses 10-200)")
    projection: bool = option(False, "produce the prefixes through an MLP (the paper's reparameterisation; PEFT's prefix_projection)")
    projection_hidden: int | None = option(None, "hidden width of that MLP (null: the key/value width)")


def kv_shape(config) -> tuple[int, int, int]:
    """(layers, key/value heads, head_dim) from a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class PrefixTuning(Adapter, method="prefix"):
    """Per-layer key/value prefixes, optionally through a reparameterisation MLP; wraps the input embedding."""

    config_cls = PrefixConfig
    config_section = "prefix"
    title = "prefix tuning (prefix.*)"
    summary = "trainable key/value prefixes in every layer; turns data.packing off"
    mergeable = False
    why_not_mergeable = ("a prefix-tuned model cannot be merged: the prefixes are attention inputs, not weights; "
                         "keep the adapter attached (leantune generate does)")
    packs = False

    @classmethod
    def attach(cls, model: nn.Module, section, tokenizer=None) -> list[str]:
        return inject_prefix(model, section.virtual_tokens, section.projection, section.projection_hidden)

    @classmethod
    def check(cls, cfg) -> None:
        p = cfg.prefix
        need(p.virtual_tokens > 0, f"prefix.virtual_tokens must be > 0, got {p.virtual_tokens}; the paper uses 10-200")
        need(p.projection_hidden is None or p.projection_hidden > 0,
             f"prefix.projection_hidden must be > 0 or null, got {p.projection_hidden}")

    @classmethod
    def count_parameters(cls, model: nn.Module, section) -> int:
        """n * L * 2 * kv_dim; with the projection, E: (n, kv_dim) and the MLP kv_dim -> hidden -> L * 2 * kv_dim."""
        layers, kv_heads, head_dim = kv_shape(model.config)
        kv_dim, n = kv_heads * head_dim, section.virtual_tokens
        width = layers * 2 * kv_dim
        if not section.projection:
            return n * width
        hidden = section.projection_hidden or kv_dim
        return n * kv_dim + (kv_dim * hidden + hidden) + (hidden * width + width)

    def __init__(self, base_layer: nn.Module, model_config, virtual_tokens: int, projection: bool = False,
                 projection_hidden: int | None = None) -> None:
        super().__init__(base_layer)
        self.model_config = model_config
        self.layers, self.kv_heads, self.head_dim = kv_shape(model_config)
        self.virtual_tokens, self.projection = virtual_tokens, projection
        kv_dim = self.kv_heads * self.head_dim
        width = self.layers * 2 * kv_dim
        # Built in PEFT's order (embedding, then the MLP's two Linears): one seed, one prefix.
        if projection:
            hidden = projection_hidden or kv_dim
            self.embedding = nn.Embedding(virtual_tokens, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, width))
        else:
            self.embedding = nn.Embedding(virtual_tokens, width)
            self.transform = None
        device = base_layer.weight.device if base_layer.weight.device.type != "meta" else None
        if device is not None:
            self.embedding.to(device)
            if self.transform is not None:
                self.transform.to(device)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.embedding.weight] + ([] if self.transform is None else list(self.transform.parameters()))

    def prefix(self) -> torch.Tensor:
        """The flat prefix P: (n, L * 2 * kv_dim)."""
        return self.embedding.weight if self.transform is None else self.transform(self.embedding.weight)

    def cache(self, batch: int, dtype: torch.dtype):
        from transformers import DynamicCache  # the cache class, not model code

        p = self.prefix().to(dtype)
        p = p.view(1, self.virtual_tokens, self.layers * 2, self.kv_heads, self.head_dim)  # (1, n, 2L, Hkv, D)
        per_layer = p.expand(batch, -1, -1, -1, -1).permute(2, 0, 3, 1, 4).split(2)  # L x (2, B, Hkv, n, D)
        cache = DynamicCache(config=self.model_config)
        for layer, (keys, values) in enumerate(per_layer):
            cache.update(keys, values, layer)
        return cache

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base_layer(input_ids)

    def extend_inputs(self, inputs: dict, generation: bool = False) -> dict:
        """Add the prefix cache; the attention mask grows by n in front, position ids move on by n."""
        ids = inputs.get("input_ids")
        if ids is None or inputs.get("past_key_values") is not None:
            return inputs
        batch, n = ids.shape[0], self.virtual_tokens
        inputs["past_key_values"] = self.cache(batch, self.base_layer.weight.dtype)
        if inputs.get("attention_mask") is not None:
            mask = inputs["attention_mask"]
            inputs["attention_mask"] = torch.cat([mask.new_ones(batch, n), mask], dim=1)
        if inputs.get("position_ids") is not None:
            inputs["position_ids"] = inputs["position_ids"] + n
        if generation:
            # generate() takes the cached length as tokens already seen and feeds input_ids[:, n:]: n
            # placeholder ids in front (never embedded) line the real prompt up behind the prefix.
            inputs["input_ids"] = torch.cat([ids.new_zeros(batch, n), ids], dim=1)
        return inputs

    def extra_repr(self) -> str:
        return f"virtual_tokens={self.virtual_tokens}, layers={self.layers}, projection={self.projection}"


def _check_attention_reads_the_cache(model: nn.Module, adapter: PrefixTuning) -> None:
    """One-token forward with a prefix cache: every layer must append to it, or the prefix is ignored."""
    ids = torch.zeros(1, 1, dtype=torch.long, device=adapter.base_layer.weight.device)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        cache = adapter.cache(1, adapter.base_layer.weight.dtype)
        try:
            model(input_ids=ids, past_key_values=cache, use_cache=False)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ModelError(f"{type(model).__name__} does not take a key/value cache (past_key_values: "
                             f"{str(e)[:80]}); prefix tuning needs one: use method prompt or lora") from None
    if cache.get_seq_length() != adapter.virtual_tokens + 1:
        raise ModelError(f"{type(model).__name__}'s attention does not read past_key_values, so a prefix would be "
                         "ignored; prefix tuning needs a cache-reading attention: use method prompt or lora")


def inject_prefix(model: nn.Module, virtual_tokens: int, projection: bool = False,
                  projection_hidden: int | None = None) -> list[str]:
    """Wrap the model's input embedding in a PrefixTuning adapter; return its path."""
    path, adapter = prefix_adapter(model, virtual_tokens, projection, projection_hidden)
    set_module(model, path, adapter)
    return [path]


def prefix_adapter(model: nn.Module, virtual_tokens: int, projection: bool = False,
                   projection_hidden: int | None = None) -> tuple[str, PrefixTuning]:
    """(path of the input embedding, a PrefixTuning adapter around it), checked (its cache is read by every
    layer) but not yet put in place."""
    if not isinstance(virtual_tokens, int) or virtual_tokens <= 0:
        raise ConfigError(f"prefix.virtual_tokens must be a positive integer, got {virtual_tokens!r}; the paper "
                          "uses 10-200")
    if projection_hidden is not None and projection_hidden <= 0:
        raise ConfigError(f"prefix.projection_hidden must be > 0 or null, got {projection_hidden!r}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_hidden_layers"):
        raise ModelError(f"{type(model).__name__} has no transformers config, so its layers and heads are unknown; "
                         "prefix tuning needs them: use a transformers causal LM")
    path = _input_embedding_path(model)
    embedding = model.get_submodule(path)
    if isinstance(embedding, Adapter):
        raise ModelError(f"{path} already has a {embedding.method} adapter; unload(model) first")
    adapter = PrefixTuning(embedding, config, virtual_tokens, projection, projection_hidden)
    _check_attention_reads_the_cache(model, adapter)
    return path, adapter
