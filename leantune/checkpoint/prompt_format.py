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
from ..adapters.prefix import inject_prefix, kv_shape
from ..adapters.prompt import inject_prompt
from ..errors import ModelError
from ..io.atomic import save_safetensors, write_json
from .peft_format import CONFIG_NAME, PEFT_FORMAT_VERSION, WEIGHTS_NAME, read_config, read_weights

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


def load_prompt(model, adapter_dir: str | Path) -> dict:
    """Attach a PEFT prompt-tuning adapter (ours or PEFT's) to `model`; return its config."""
    import torch

    d = Path(adapter_dir)
    config = read_config(d)
    if config.get("peft_type") != "PROMPT_TUNING":
        raise ModelError(f"{d / CONFIG_NAME} is a {config.get('peft_type')} adapter, not PROMPT_TUNING")
    if config.get("num_transformer_submodules", 1) != 1:
        raise ModelError(f"{d / CONFIG_NAME} is for an encoder-decoder (num_transformer_submodules=2); leantune "
                         "trains decoder-only models")
    weights = read_weights(d)
    if set(weights) != {KEY}:
        raise ModelError(f"{d / WEIGHTS_NAME} holds {sorted(weights)}, a prompt-tuning adapter holds only {KEY}")
    embeddings = weights[KEY]
    hidden = model.get_input_embeddings().weight.shape[1]
    if embeddings.ndim != 2 or embeddings.shape[1] != hidden:
        raise ModelError(f"adapter was trained for a different base: its prompt is {tuple(embeddings.shape)}, this "
                         f"model's embeddings are {hidden} wide")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        (path,) = inject_prompt(model, int(embeddings.shape[0]))
        adapter = model.get_submodule(path)
        adapter.prompt_embeddings.copy_(embeddings)
        adapter.train(model.training)
    return config


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


def load_prefix(model, adapter_dir: str | Path) -> dict:
    """Attach a PEFT prefix-tuning adapter (ours or PEFT's) to `model`; return its config."""
    import torch

    d = Path(adapter_dir)
    config = read_config(d)
    if config.get("num_transformer_submodules", 1) != 1:
        raise ModelError(f"{d / CONFIG_NAME} is for an encoder-decoder (num_transformer_submodules=2); leantune "
                         "trains decoder-only models")
    weights = read_weights(d)
    if set(weights) != {KEY}:
        raise ModelError(f"{d / WEIGHTS_NAME} holds {sorted(weights)}, a prefix-tuning adapter holds only {KEY}")
    flat = weights[KEY]
    layers, kv_heads, head_dim = kv_shape(model.config)
    width = layers * 2 * kv_heads * head_dim
    if flat.ndim != 2 or flat.shape[1] != width:
        raise ModelError(f"adapter was trained for a different base: its prefix is {tuple(flat.shape)}, this model "
                         f"needs (n, {width}) = (n, layers * 2 * kv heads * head_dim)")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        (path,) = inject_prefix(model, int(flat.shape[0]))
        adapter = model.get_submodule(path)
        adapter.embedding.weight.copy_(flat)
        adapter.train(model.training)
    return config
