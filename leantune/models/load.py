"""Load a base model and its tokenizer from a local HF folder, a hub id, or a .gguf file.

Three kinds of `source`, told apart in this order:
  * a path ending in .gguf: converted once to a plain HF folder cached under
    `$LEANTUNE_CACHE/gguf/<sha256 of the file>/` (default `~/.cache/leantune`), then loaded from there;
  * an existing folder: must hold config.json and weights, checked before transformers sees it;
  * anything else that looks like `org/name`: a hub id. Offline (HF_HUB_OFFLINE=1, or the hub not
    answering within a few seconds) it loads only from the local HF cache, else it fails at once
    with the command that downloads it.

dtype policy (`pick_dtype`): "auto" is bf16 only where bf16 matmuls are fast (CUDA compute >= 8.0;
CPUs with avx512_bf16 or amx_bf16), else fp32. On a CPU without those flags torch emulates bf16
(measured on a Cascade Lake Xeon without avx512_bf16: 40 GFLOPS bf16 vs 130 fp32). fp16 on CPU
is slower still (a 576x1536 Linear: 5x fp32's time) and overflows where bf16 does not, so it is
refused.

Nothing here sets requires_grad, eval() or use_cache: that is the caller's business.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
GGUF_MARKER = "leantune-gguf.json"  # written last into a converted folder; says where it came from

_DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
                "fp16": "float16", "float16": "float16", "half": "float16"}


# ---------------------------------------------------------------------------------------------
# Device and dtype


def resolve_device(requested: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when torch sees a GPU, else cpu. "cuda"/"cuda:N" without a GPU is an error."""
    import torch

    if isinstance(requested, torch.device):
        requested = str(requested)
    req = str(requested).strip().lower()
    if req == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(req)
    except RuntimeError:
        raise ConfigError(f"device must be auto, cpu or cuda (or cuda:N), got {requested!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise ConfigError(f"device {requested!r} was asked for but torch sees no CUDA GPU (torch "
                              f"{torch.__version__}, {build}); use device: cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {requested!r}: torch sees only {torch.cuda.device_count()} GPU(s); "
                              f"use cuda:0..cuda:{torch.cuda.device_count() - 1}")
    elif device.type != "cpu":
        raise ConfigError(f"device must be auto, cpu or cuda (or cuda:N), got {requested!r}")
    return device


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls in hardware (AVX512-BF16: Cooper Lake, Zen 4+; AMX: Sapphire Rapids+)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def _cuda_has_fast_bf16(device: torch.device) -> bool:
    import torch

    try:  # including_emulation=False: pre-Ampere GPUs "support" bf16 only by emulating it
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch without the argument
        return torch.cuda.get_device_capability(device)[0] >= 8


def pick_dtype(requested: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The dtype for the frozen base weights: "auto" | "bf16" | "fp32" (or a torch.dtype)."""
    import torch

    device = resolve_device(device) if not isinstance(device, torch.device) else device
    if isinstance(requested, torch.dtype):
        return _allowed(requested, device, requested)
    name = str(requested).strip().lower()
    if name == "auto":
        fast = _cuda_has_fast_bf16(device) if device.type == "cuda" else cpu_has_fast_bf16()
        return torch.bfloat16 if fast else torch.float32
    if name not in _DTYPE_NAMES:
        raise ConfigError(f"dtype must be auto, bf16 or fp32, got {requested!r}")
    dtype = _allowed(getattr(torch, _DTYPE_NAMES[name]), device, requested)
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_fast_bf16():
        warnings.warn("bf16 on this CPU is emulated (no avx512_bf16/amx_bf16 flag): expect it to be ~3x "
                      "slower than fp32; dtype: auto picks fp32 here", stacklevel=2)
    return dtype


def _allowed(dtype: torch.dtype, device: torch.device, requested: object) -> torch.dtype:
    import torch

    if dtype not in (torch.bfloat16, torch.float32, torch.float16):
        raise ConfigError(f"dtype must be auto, bf16 or fp32, got {requested!r}")
    if device.type == "cpu" and dtype == torch.float16:
        raise ConfigError("fp16 is not supported on CPU (no fast fp16 matmul kernels: several times slower than "
                          "fp32, and it overflows where bf16 does not); use dtype: bf16 or fp32 (auto picks bf16 "
                          "where the CPU has avx512_bf16/amx_bf16)")
    return dtype


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
        raise ModelError(f"cannot load the tokenizer of {os.fspath(source)!r}: {_first_line(e)}") from e


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
        from .quantized import load_quantized

        return load_quantized(src, quant, dtype=dtype, device=device, attn_implementation=attn_implementation,
                              trust_remote_code=trust_remote_code)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, attn_implementation=attn_implementation,
                                                     trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        hint = ""
        if not trust_remote_code and ("trust_remote_code" in str(e) or "recognize this architecture" in str(e)):
            hint = "; if the folder ships its own model code and you trust it, set trust_remote_code: true"
        raise ModelError(f"cannot load model {os.fspath(source)!r}: {_first_line(e)}{hint}") from e
    if device.type != "cpu":
        model.to(device)
    log.info("loaded %s in %.1f s: %s", source, time.perf_counter() - t0, model_info(model))
    return model


def _saved_bnb(src: str) -> bool:
    from .quantized import saved_quantization

    return (saved_quantization(src) or {}).get("quant_method") == "bitsandbytes"


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


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------
# GGUF -> cached HF folder


def cache_root() -> Path:
    """$LEANTUNE_CACHE, else $XDG_CACHE_HOME/leantune, else ~/.cache/leantune."""
    if os.environ.get("LEANTUNE_CACHE"):
        return Path(os.environ["LEANTUNE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "leantune"


def file_sha256(path: Path) -> str:
    """sha256 of the file's bytes, remembered per (path, size, mtime, inode) so a multi-GB GGUF is hashed once.

    The memo is a one-line file under <cache>/gguf/stat/, named by a hash of those four values; a
    file rewritten in place gets a new mtime and is hashed again.
    """
    from ..checkpoint.atomic import write_text

    st = path.stat()
    stat_key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}".encode()).hexdigest()
    memo = cache_root() / "gguf" / "stat" / stat_key[:32]
    with contextlib.suppress(OSError):
        digest = memo.read_text().strip()
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            return digest
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    digest = h.hexdigest()
    with contextlib.suppress(OSError):
        write_text(memo, digest + "\n")
    return digest


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock (POSIX flock) so parallel processes (pytest-xdist) convert a GGUF once, not twice."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; the atomic rename still keeps the folder whole
            yield
            return
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def gguf_to_hf(gguf_path: str | os.PathLike) -> Path:
    """Convert a .gguf file to a plain HF folder once; return the cached folder.

    The folder is <cache>/gguf/<sha256 of the file>/: config.json, generation_config.json,
    model.safetensors (fp32), the tokenizer with its chat template, and leantune-gguf.json (source
    name, size, sha256, transformers version). It is written through atomic_dir, so it either
    exists whole or not at all.

    Weights stay fp32: dequantized k-quant/Q4 values are fp16 scale * int (+ fp16 min), exact in
    fp32 but not in bf16; rounding them to bf16 would quantize the model a second time. Loading in
    bf16 later rounds them anyway, at no cost to the fp32 path.
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise ModelError(f"GGUF file {str(path)!r} does not exist; check the path (model: path/to/model.gguf)")
    digest = file_sha256(path)
    root = cache_root() / "gguf"
    out = root / digest
    if (out / GGUF_MARKER).is_file():
        return out
    with contextlib.suppress(OSError):
        root.mkdir(parents=True, exist_ok=True)
    if not os.access(root, os.W_OK):
        raise ModelError(f"cannot write the GGUF cache {str(root)!r}; set LEANTUNE_CACHE to a writable folder")
    with _file_lock(root / f"{digest}.lock"):
        if (out / GGUF_MARKER).is_file():  # another process finished it while we waited
            return out
        for stale in root.glob(f".{digest}.*.tmp"):  # a killed conversion's leftovers; the lock says none is live
            shutil.rmtree(stale, ignore_errors=True)
        log.warning("converting %s (%.0f MB) to an HF folder once; dequantizing takes ~40 s per 100 MB on 2 CPU "
                    "cores -> %s", path.name, path.stat().st_size / 1e6, out)
        t0 = time.perf_counter()
        from ..checkpoint.atomic import atomic_dir, write_json

        with atomic_dir(out) as tmp:
            _convert_gguf(path, tmp)
            write_json(tmp / GGUF_MARKER, _gguf_provenance(path, digest, time.perf_counter() - t0))
    return out


def _gguf_provenance(path: Path, digest: str, seconds: float) -> dict:
    import transformers

    return {"source_name": path.name, "source_path": str(path.resolve()), "size": path.stat().st_size,
            "sha256": digest, "weights_dtype": "float32", "transformers": transformers.__version__,
            "convert_seconds": round(seconds, 1)}


def _convert_gguf(path: Path, out: Path) -> None:
    """transformers dequantizes the GGUF; its model refuses save_pretrained (it carries a gguf
    quantization_config), so the weights move into a clean model of the same class and that one is saved."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot read GGUF {str(path)!r}: {_first_line(e)} (transformers reads llama, mistral, "
                         f"qwen2/3, gemma2/3, phi3 and a few more; convert other models with llama.cpp's tools)") from e

    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.architectures = [type(loaded).__name__]
    config.dtype = torch.float32
    with no_init_weights():  # every weight is overwritten next; skip the 4 s random init
        clean = type(loaded)(config)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    tied = set(getattr(clean, "all_tied_weights_keys", {}) or {}) | {"lm_head.weight"}
    if unexpected or set(missing) - tied:
        raise ModelError(f"GGUF {path.name}: the dequantized weights do not fit {type(loaded).__name__} "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {unexpected[:3]})")
    clean.tie_weights()
    clean.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded
    clean.save_pretrained(out)
    if getattr(config, "max_position_embeddings", None):  # the GGUF's context length, not transformers' 1e30 default
        tokenizer.model_max_length = config.max_position_embeddings
    tokenizer.save_pretrained(out)
    _portable_tokenizer_class(out)


def _portable_tokenizer_class(folder: Path) -> None:
    """transformers 5 writes tokenizer_class "TokenizersBackend", which 4.x cannot read;
    "PreTrainedTokenizerFast" loads the same tokenizer.json in both."""
    from ..checkpoint.atomic import write_json

    cfg_path = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    if cfg.get("tokenizer_class") in (None, "TokenizersBackend"):
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        write_json(cfg_path, cfg)
