"""Load a base model and its tokenizer from a local HF folder, a hub id, or a .gguf file.

Three kinds of `source`, told apart in this order:
  * a path ending in .gguf: converted once to a plain HF folder cached under
    `$LEANTUNE_CACHE/gguf/<sha256 of the file>/` (default `~/.cache/leantune`), then loaded from there
    (`models/gguf_import.py`);
  * an existing folder: must hold config.json and weights, checked before transformers sees it;
  * anything else that looks like `org/name`: a hub id. Offline (HF_HUB_OFFLINE=1, or the hub not
    answering within a few seconds) it loads only from the local HF cache, else it fails at once
    with the command that downloads it.

The dtype "auto" and the device "auto" resolve through `leantune.device` (bf16 only where it is fast).

With a `quant` section (bits 4 or 8), or from a folder saved quantized by bitsandbytes, `load_model`
hands over to `models.quantized`, which quantizes the Linear layers while streaming the weights.

Nothing here sets requires_grad, eval() or use_cache: that is the caller's business.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError

from ..device import pick_dtype, resolve_device
from ..errors import ModelError, first_line
from .gguf_import import gguf_to_hf
from .quantized import load_quantized, saved_quantization

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# ---------------------------------------------------------------------------------------------
# Where a source lives


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def _is_gguf(source: str) -> bool:
    return source.lower().endswith(".gguf")


def _hub_offline() -> bool:
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")
    try:
        from huggingface_hub import constants
    except ImportError:
        return env
    return env or bool(constants.HF_HUB_OFFLINE)


def _offline_error(repo_id: str) -> ModelError:
    return ModelError(f"model {repo_id!r} is not a local folder and the hub is unreachable (offline): download it "
                      f"first (hf download {repo_id} --local-dir DIR) and pass DIR")


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an id the hub library rejects (HFValidationError) is simply not cached
        return False


def _check_hub_id(source: str) -> None:
    """Fail fast (a few seconds at most) when a hub id cannot be fetched; do nothing when it can."""
    if not _HUB_ID.match(source) or ".." in source:
        raise ModelError(f"model {source!r} is neither an existing folder, a .gguf file nor a hub id (org/name); "
                         f"check the path")
    if _in_hf_cache(source):
        return  # transformers falls back to the cache by itself when offline
    if _hub_offline():
        raise _offline_error(source)
    from huggingface_hub import model_info
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        model_info(source, timeout=HUB_PROBE_TIMEOUT_S)
    except GatedRepoError:
        return  # the info is public; the download then says what access it needs
    except RepositoryNotFoundError:
        raise ModelError(f"model {source!r} is not a local folder and not a model on the hub: check the spelling "
                         f"(a local folder must exist; a hub id is org/name)") from None
    except HfHubHTTPError:
        return  # the hub answered: let the download report the details
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeout, proxy: the hub is unreachable
        log.debug("hub probe for %s failed: %r", source, e)
        raise _offline_error(source) from None


def _check_folder(folder: Path, *, need_weights: bool) -> None:
    if not folder.is_dir():
        raise ModelError(f"model folder {str(folder)!r} does not exist; pass an HF folder (with config.json), a "
                         f".gguf file, or a hub id (org/name)")
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    if not (folder / "config.json").is_file():
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} entries)" if len(names) > 8 else "") or "nothing"
        hint = "pass a Hugging Face model folder (config.json + model.safetensors + tokenizer files)"
        if (folder / "adapter_config.json").is_file():
            hint = ("this is an adapter folder: pass its base model (base_model_name_or_path in "
                    "adapter_config.json) as model")
        elif any(n.lower().endswith(".gguf") for n in names):
            hint = "pass the .gguf file itself as model"
        raise ModelError(f"model folder {str(folder)!r} has no config.json (it holds: {shown}); {hint}")
    if need_weights and not any(any(folder.glob(p)) for p in WEIGHT_PATTERNS):
        raise ModelError(f"model folder {str(folder)!r} has config.json but no weights (model.safetensors or "
                         f"pytorch_model.bin); copy them in, or pass the complete model folder")


def resolve_source(source: str | os.PathLike, *, need_weights: bool = True) -> str:
    """Return what transformers should load: a checked local folder, or a hub id known to be fetchable.

    A .gguf file is converted (once, cached) and its HF folder is returned.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if _is_gguf(text):
        return str(gguf_to_hf(path))
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        _check_folder(path, need_weights=need_weights)
        return str(path)
    _check_hub_id(text)
    return text


# ---------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(source: str | os.PathLike, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer (with its chat template) of a local folder, a hub id or a .gguf file."""
    from transformers import AutoTokenizer

    src = resolve_source(source, need_weights=False)
    if Path(src).is_dir() and not any((Path(src) / f).is_file() for f in TOKENIZER_FILES):
        raise ModelError(f"model folder {src!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy them "
                         f"from the base model into it")
    try:
        return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {os.fspath(source)!r}: {first_line(e)}") from e


def load_model(source: str | os.PathLike, *, dtype: str | torch.dtype, device: str | torch.device,
               attn_implementation: str = "sdpa", trust_remote_code: bool = False, quant: Any = None) -> PreTrainedModel:
    """A causal LM in `dtype` on `device`, exactly as stored (no eval(), no requires_grad changes).

    With `quant` (a QuantConfig or QuantSpec whose bits is 4 or 8), or from a folder saved quantized by
    bitsandbytes, the Linear layers are quantized while loading (`models.quantized`).
    """
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    dtype = pick_dtype(dtype, device)
    src = resolve_source(source)
    if (quant is not None and quant.bits is not None) or _saved_bnb(src):
        return load_quantized(src, quant, dtype=dtype, device=device, attn_implementation=attn_implementation,
                              trust_remote_code=trust_remote_code)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a truncated or garbled weights file
        hint = "; the weights file is damaged or truncated: copy or download it again" if isinstance(
            e, SafetensorError) else ""
        if not trust_remote_code and ("trust_remote_code" in str(e) or "recognize this architecture" in str(e)):
            hint = "; if the folder ships its own model code and you trust it, set trust_remote_code: true"
        raise ModelError(f"cannot load model {os.fspath(source)!r}: {first_line(e)}{hint}") from e
    if device.type != "cpu":
        model.to(device)
    log.info("loaded %s in %.1f s: %s", source, time.perf_counter() - t0, model_info(model))
    return model


def _saved_bnb(src: str) -> bool:
    return (saved_quantization(src) or {}).get("quant_method") == "bitsandbytes"


def check_vocab(model: Any, tokenizer: Any) -> None:
    """Refuse a tokenizer whose ids can exceed the model's embedding table (a tokenizer from another
    model): without this check the first such id fails deep inside the embedding lookup."""
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None) or embedding.weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows: the "
                         f"tokenizer belongs to another model; use the tokenizer files of this model's folder")


def model_info(model: Any) -> dict:
    """A one-line summary for logs: architecture, parameter count, layers, hidden, vocab, dtype, device."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    first = next(model.parameters())
    return {
        "architecture": type(model).__name__,
        "params": sum(p.numel() for p in model.parameters()),  # parameters() skips tied duplicates
        "layers": getattr(cfg, "num_hidden_layers", None),
        "hidden": getattr(cfg, "hidden_size", None),
        "vocab": getattr(cfg, "vocab_size", None),
        "dtype": str(first.dtype).removeprefix("torch."),
        "device": str(first.device),
    }
