"""Save and load any method's adapter folder: the writer is picked by the model's adapters, the reader by
the folder's `peft_type` (LORA, with or without use_dora; IA3; PROMPT_TUNING; PREFIX_TUNING; leantune's BOTTLENECK).

Every folder holds adapter_config.json + adapter_model.safetensors, so `leantune generate` finds the base
model the same way for all of them.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters.base import adapter_modules
from ..errors import ModelError
from .bottleneck_format import PEFT_TYPE as BOTTLENECK, load_bottleneck, save_bottleneck
from .ia3_format import load_ia3, save_ia3
from .peft_format import CONFIG_NAME, load_adapter as load_lora, read_config, save_adapter as save_lora
from .prompt_format import load_prefix, load_prompt, save_prefix, save_prompt


def save_adapter(model, out_dir: str | Path, *, base_model_name_or_path: str | None = None, config=None) -> Path:
    """Write the model's adapters in their method's format; `config` (a RunConfig) supplies the targets
    asked for, which decide between writing a regex and module names."""
    methods = sorted({a.method for a in adapter_modules(model).values()})
    if len(methods) != 1:
        raise ModelError(f"an adapter folder holds one method; this model holds {', '.join(methods) or 'no adapters'}")
    method = methods[0]
    if method in ("lora", "dora"):
        targets = config.lora.targets if config is not None else None
        return save_lora(model, out_dir, base_model_name_or_path=base_model_name_or_path, targets=targets)
    if method == "ia3":
        targets = config.ia3.targets if config is not None else None
        return save_ia3(model, out_dir, base_model_name_or_path=base_model_name_or_path, targets=targets)
    if method == "bottleneck":
        return save_bottleneck(model, out_dir, base_model_name_or_path=base_model_name_or_path)
    if method == "prefix":
        return save_prefix(model, out_dir, base_model_name_or_path=base_model_name_or_path)
    if method == "prompt":
        init_text = config.prompt.init_text if config is not None and config.prompt.init == "text" else None
        return save_prompt(model, out_dir, base_model_name_or_path=base_model_name_or_path, init_text=init_text)
    raise ModelError(f"no adapter format for method {method!r} yet")


def load_adapter(model, adapter_dir: str | Path) -> dict:
    """Attach a saved adapter (ours or PEFT's) to `model`; return its config."""
    config = read_config(adapter_dir)
    readers = {"LORA": load_lora, "IA3": load_ia3, "PROMPT_TUNING": load_prompt,
               "PREFIX_TUNING": load_prefix, BOTTLENECK: load_bottleneck}
    peft_type = config.get("peft_type")
    if peft_type not in readers:
        raise ModelError(f"{Path(adapter_dir) / CONFIG_NAME} is a {peft_type} adapter; leantune loads "
                         f"{', '.join(readers)} (LORA with use_dora for DoRA)")
    return readers[peft_type](model, adapter_dir)
