"""Prompt tuning (Lester et al. 2021, https://arxiv.org/abs/2104.08691): n trainable virtual-token
embeddings P: (n, hidden) are put in front of every input's embeddings.

    inputs_embeds = [P ; E(x)]     attention mask [1...1 ; mask]     labels [-100...-100 ; labels]

The base stays untouched; only P trains. P starts as n random rows drawn like nn.Embedding's init
("random"), or as the embeddings of a text's tokens, repeated or cut to n ("text"; the paper found a
task description works better than random). Nothing folds into a weight: it is not mergeable.

The adapter wraps the input embedding (its `base_layer`), whose own forward it passes through
unchanged, so decoding steps after the first see plain tokens. The prompt is prepended by
`extend_inputs`, the one hook the training step and `leantune generate` call for every method
(leantune/adapters/base.py, `prepare_inputs`). Rows are taken whole: packed rows (several examples per
row, position ids restarting) would leave every example but the first without the prompt, so the
method declares `packs = False` and the loop unpacks. This is PEFT 0.21.2's PromptEmbedding and its
causal-LM forward (peft/tuners/prompt_tuning/model.py, peft/peft_model.py): position ids are dropped,
as PEFT drops them, and the model numbers the positions 0..n+T-1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..config import need, option
from ..errors import ConfigError, ModelError
from .base import Adapter, set_module

INITS = ("random", "text")
IGNORE_INDEX = -100


@dataclass
class PromptConfig:
    """The `prompt:` section."""

    virtual_tokens: int = option(20, "virtual tokens prepended to every input (the paper uses 20-100)")
    init: Literal["random", "text"] = option("random", "start the virtual tokens at random, or at the embeddings of init_text")
    init_text: str | None = option(None, "text whose token embeddings start the prompt (repeated or cut to virtual_tokens)")


def _input_embedding_path(model: nn.Module) -> str:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    for path, module in model.named_modules():
        if module is embedding and path:
            return path
    raise ModelError(f"{type(model).__name__} exposes no input embedding (get_input_embeddings); prompt tuning "
                     "prepends to it: use a transformers causal LM, or lora/ia3")


class PromptTuning(Adapter, method="prompt"):
    """n virtual-token embeddings prepended to every input; wraps the model's input embedding."""

    config_cls = PromptConfig
    config_section = "prompt"
    title = "prompt tuning (prompt.*)"
    summary = "trainable virtual tokens in front of the input; turns data.packing off"
    mergeable = False
    why_not_mergeable = ("a prompt-tuned model cannot be merged: the virtual tokens are inputs, not weights; "
                         "keep the adapter attached (leantune generate does)")
    packs = False

    @classmethod
    def attach(cls, model: nn.Module, section, tokenizer=None) -> list[str]:
        init_ids = None
        if section.init == "text":
            if not section.init_text:
                raise ConfigError("prompt.init text needs prompt.init_text (e.g. 'Answer the question briefly.')")
            if tokenizer is None:
                raise ConfigError("prompt.init text needs the model's tokenizer to read prompt.init_text")
            init_ids = tokenizer(section.init_text)["input_ids"]
        return inject_prompt(model, section.virtual_tokens, init_ids)

    @classmethod
    def check(cls, cfg) -> None:
        p = cfg.prompt
        need(p.virtual_tokens > 0, f"prompt.virtual_tokens must be > 0, got {p.virtual_tokens}; the paper uses 20-100")
        need(p.init != "text" or bool(p.init_text),
             "prompt.init text needs prompt.init_text (e.g. 'Answer the question briefly.'), or use prompt.init random")

    @classmethod
    def count_parameters(cls, model: nn.Module, section) -> int:
        """n * hidden: one embedding row per virtual token."""
        return section.virtual_tokens * model.get_submodule(_input_embedding_path(model)).weight.shape[1]

    def __init__(self, base_layer: nn.Embedding, virtual_tokens: int, init_ids: Sequence[int] | None = None) -> None:
        super().__init__(base_layer)
        hidden = base_layer.weight.shape[1]
        # Drawn as nn.Embedding draws (normal(0, 1)), on the CPU: PEFT's random init, one seed, one prompt.
        weight = nn.Embedding(virtual_tokens, hidden).weight.detach()
        if init_ids is not None:
            ids = list(init_ids) * math.ceil(virtual_tokens / max(len(init_ids), 1))  # repeat, then cut to n
            with torch.no_grad():
                weight = base_layer(torch.tensor(ids[:virtual_tokens], device=base_layer.weight.device))
            weight = weight.detach().clone().float()
        self.prompt_embeddings = nn.Parameter(weight.to(base_layer.weight.device))
        self.virtual_tokens = virtual_tokens

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.prompt_embeddings]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base_layer(input_ids)

    def extend_inputs(self, inputs: dict, generation: bool = False) -> dict:
        """input_ids -> inputs_embeds with the prompt in front; mask and labels grow to match."""
        if "input_ids" not in inputs:
            return inputs
        ids = inputs.pop("input_ids")  # (B, T)
        embeds = self.base_layer(ids)  # (B, T, H)
        batch = ids.shape[0]
        prompt = self.prompt_embeddings.unsqueeze(0).expand(batch, -1, -1).to(embeds.dtype)  # (B, n, H)
        inputs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, n + T, H)
        inputs.pop("position_ids", None)
        if inputs.get("attention_mask") is not None:
            mask = inputs["attention_mask"]
            inputs["attention_mask"] = torch.cat([mask.new_ones(batch, self.virtual_tokens), mask], dim=1)
        if inputs.get("labels") is not None:
            labels = inputs["labels"]
            inputs["labels"] = torch.cat([labels.new_full((batch, self.virtual_tokens), IGNORE_INDEX), labels], dim=1)
        return inputs

    def extra_repr(self) -> str:
        return f"virtual_tokens={self.virtual_tokens}"


def inject_prompt(model: nn.Module, virtual_tokens: int, init_ids: Sequence[int] | None = None) -> list[str]:
    """Wrap the model's input embedding in a PromptTuning adapter; return its path."""
    path, adapter = prompt_adapter(model, virtual_tokens, init_ids)
    set_module(model, path, adapter)
    return [path]


def prompt_adapter(model: nn.Module, virtual_tokens: int, init_ids: Sequence[int] | None = None) -> tuple[str, PromptTuning]:
    """(path of the input embedding, a PromptTuning adapter around it), checked but not yet put in place."""
    if not isinstance(virtual_tokens, int) or virtual_tokens <= 0:
        raise ConfigError(f"prompt.virtual_tokens must be a positive integer, got {virtual_tokens!r}; the paper "
                          "uses 20-100")
    if init_ids is not None and not len(init_ids):
        raise ConfigError("prompt.init_text has no tokens; give a non-empty text or use prompt.init random")
    path = _input_embedding_path(model)
    embedding = model.get_submodule(path)
    if isinstance(embedding, Adapter):
        raise ModelError(f"{path} already has a {embedding.method} adapter; unload(model) first")
    if not isinstance(embedding, nn.Embedding):
        raise ModelError(f"the input embedding {path} is a {type(embedding).__name__}, not an nn.Embedding; "
                         "prompt tuning needs a plain embedding table")
    return path, PromptTuning(embedding, virtual_tokens, init_ids)
