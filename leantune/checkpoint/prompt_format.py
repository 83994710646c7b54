"""Prompt- and prefix-tuning adapters on disk in PEFT's format: PEFT loads ours and we load PEFT's.

  adapter_config.json         the PromptTuningConfig fields (peft_type "PROMPT_TUNING", num_virtual_tokens,
                              token_dim, num_layers, num_attention_heads, prompt_tuning_init, ...)
  adapter_model.safetensors   prompt_embeddings    (num_virtual_tokens, token_dim)
No module paths: the prompt goes in front of the model's input embedding, wherever that lives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adapters.base import adapter_modules
from ..adapters.prefix import PrefixTuning, kv_shape, prefix_adapter
from ..adapters.prompt import PromptTuning, prompt_adapter
from ..errors import ModelError
from ..io.atomic import save_safetensors, write_json
from ..adapters.format import CONFIG_NAME, WEIGHTS_NAME, AdapterFormat
from .peft_format import PEFT_FORMAT_VERSION

KEY = "prompt_embeddings"

PEFT_PROMPT_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None, "base_model_name_or_path": None, "inference_mode": True, "modules_to_save": None,
    "num_attention_heads": None, "num_layers": None, "num_transformer_submodules": 1, "num_virtual_tokens": None,
    "peft_type": "PROMPT_TUNING", "peft_version": PEFT_FORMAT_VERSION, "prompt_tuning_init": "RANDOM",
    "prompt_tuning_init_text": None, "revision": None, "task_type": "CAUSAL_LM", "token_dim": None,
    "tokenizer_kwargs": None, "tokenizer_name_or_path": None,
}


def _the_prompt(model):
    adapters = list(adapter_modules(model).values())
    if len(adapters) != 1 or adapters[0].method != "prompt":
        raise ModelError("save_prompt writes one prompt-tuning adapter; this model holds "
                         f"{', '.join(sorted(a.method for a in adapters)) or 'none'}")
    return adapters[0]


def save_prompt(model, out_dir: str | Path, *, base_model_name_or_path: str | None = None,
                init_text: str | None = None) -> Path:
    prompt = _the_prompt(model)
    config = getattr(model, "config", None)
    n, dim = prompt.prompt_embeddings.shape
    fields = dict(PEFT_PROMPT_DEFAULTS)
    fields.update(
        base_model_name_or_path=None if base_model_name_or_path is None else str(base_model_name_or_path),
        num_virtual_tokens=n, token_dim=dim,
        num_layers=getattr(config, "num_hidden_layers", None), num_attention_heads=getattr(config, "num_attention_heads", None),
        # Inference needs neither; recorded as a fact about how training started.
        prompt_tuning_init="TEXT" if init_text else "RANDOM", prompt_tuning_init_text=init_text or None,
        tokenizer_name_or_path=fields["tokenizer_name_or_path"] if not init_text else base_model_name_or_path,
    )
    out = Path(out_dir)
    save_safetensors({KEY: prompt.prompt_embeddings.detach().cpu()}, out / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json(out / CONFIG_NAME, fields)  # last: a folder with a config is complete
    return out


# ---------------------------------------------------------------------------------------------
# Prefix tuning: the same single tensor, holding every layer's keys and values.
#   prompt_embeddings   (num_virtual_tokens, num_layers * 2 * token_dim), token_dim = kv heads * head_dim

PEFT_PREFIX_DEFAULTS: dict[str, Any] = {
    "auto_mapping": None, "base_model_name_or_path": None, "encoder_hidden_size": None, "inference_mode": True,
    "init_weights": None, "modules_to_save": None, "num_attention_heads": None, "num_layers": None,
    "num_transformer_submodules": 1, "num_virtual_tokens": None, "peft_type": "PREFIX_TUNING",
    "peft_version": PEFT_FORMAT_VERSION, "prefix_projection": False, "revision": None, "task_type": "CAUSAL_LM",
    "token_dim": None,
}


def save_prefix(model, out_dir: str | Path, *, base_model_name_or_path: str | None = None) -> Path:
    """Save the final prefix P (after the projection MLP, if any): PEFT loads it without the MLP, as it
    loads its own in inference mode, so the folder records prefix_projection false."""
    adapters = list(adapter_modules(model).values())
    if len(adapters) != 1 or adapters[0].method != "prefix":
        raise ModelError("save_prefix writes one prefix-tuning adapter; this model holds "
                         f"{', '.join(sorted(a.method for a in adapters)) or 'none'}")
    prefix = adapters[0]
    fields = dict(PEFT_PREFIX_DEFAULTS)
    fields.update(
        base_model_name_or_path=None if base_model_name_or_path is None else str(base_model_name_or_path),
        num_virtual_tokens=prefix.virtual_tokens, token_dim=prefix.kv_heads * prefix.head_dim,
        encoder_hidden_size=prefix.kv_heads * prefix.head_dim, num_attention_heads=prefix.kv_heads,
        num_layers=prefix.layers,
    )
    import torch

    with torch.no_grad():
        flat = prefix.prefix().detach().float().cpu()
    out = Path(out_dir)
    save_safetensors({KEY: flat}, out / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json(out / CONFIG_NAME, fields)
    return out


class _VirtualTokenFormat(AdapterFormat):
    """PEFT's prompt-learning folders: leantune reads those of decoder-only models."""

    @classmethod
    def check_config(cls, config: dict, where: Path) -> None:
        super().check_config(config, where)
        if config.get("num_transformer_submodules", 1) != 1:
            raise ModelError(f"{where} is for an encoder-decoder (num_transformer_submodules=2); leantune "
                             "trains decoder-only models")


class PromptFormat(_VirtualTokenFormat, method=PromptTuning, peft_type="PROMPT_TUNING"):
    """PEFT's prompt-tuning folder."""

    @classmethod
    def save(cls, model, out_dir: str | Path, *, base_model_name_or_path: str | None = None, section=None) -> Path:
        init_text = section.init_text if section is not None and section.init == "text" else None
        return save_prompt(model, out_dir, base_model_name_or_path=base_model_name_or_path, init_text=init_text)

    @classmethod
    def build(cls, model, config: dict, weights: dict, where: Path) -> dict:
        embeddings = _the_tensor(weights, where, "prompt-tuning")
        hidden = model.get_input_embeddings().weight.shape[1]
        if embeddings.ndim != 2 or embeddings.shape[1] != hidden:
            raise ModelError(f"adapter was trained for a different base: its prompt is {tuple(embeddings.shape)}, this "
                             f"model's embeddings are {hidden} wide")
        path, adapter = prompt_adapter(model, int(embeddings.shape[0]))
        adapter.prompt_embeddings.copy_(embeddings)
        return {path: adapter}


class PrefixFormat(_VirtualTokenFormat, method=PrefixTuning, peft_type="PREFIX_TUNING"):
    """PEFT's prefix-tuning folder (the prefix after the projection MLP, if any)."""

    @classmethod
    def save(cls, model, out_dir: str | Path, *, base_model_name_or_path: str | None = None, section=None) -> Path:
        return save_prefix(model, out_dir, base_model_name_or_path=base_model_name_or_path)

    @classmethod
    def build(cls, model, config: dict, weights: dict, where: Path) -> dict:
        flat = _the_tensor(weights, where, "prefix-tuning")
        layers, kv_heads, head_dim = kv_shape(model.config)
        width = layers * 2 * kv_heads * head_dim
        if flat.ndim != 2 or flat.shape[1] != width:
            raise ModelError(f"adapter was trained for a different base: its prefix is {tuple(flat.shape)}, this model "
                             f"needs (n, {width}) = (n, layers * 2 * kv heads * head_dim)")
        path, adapter = prefix_adapter(model, int(flat.shape[0]))
        adapter.embedding.weight.copy_(flat)
        return {path: adapter}


def _the_tensor(weights: dict, where: Path, what: str):
    if set(weights) != {KEY}:
        raise ModelError(f"{where / WEIGHTS_NAME} holds {sorted(weights)}, a {what} adapter holds only {KEY}")
    return weights[KEY]
