"""Save and load any method's adapter folder: the writer is the format registered for the class of the
model's adapters, the reader the format registered for the folder's `peft_type` (adapters/format.py).

Importing this module registers the built-in formats: PEFT's LORA (with use_dora for DoRA), IA3,
PROMPT_TUNING and PREFIX_TUNING, and leantune's BOTTLENECK. A new method's format registers itself the
same way, wherever its class is defined.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters.base import METHODS, adapter_modules
from ..errors import ModelError
from . import bottleneck_format, ia3_format, peft_format, prompt_format  # noqa: F401  (registration happens on import)
from ..adapters.format import BY_PEFT_TYPE, CONFIG_NAME, format_for, read_config


def save_adapter(model, out_dir: str | Path, *, base_model_name_or_path: str | None = None, config=None) -> Path:
    """Write the model's adapters in their method's format; `config` (a RunConfig) supplies the method's
    section (the targets asked for decide between writing a regex and module names, ...)."""
    kinds = {type(a) for a in adapter_modules(model).values()}
    if len(kinds) != 1:
        names = sorted({k.method for k in kinds})
        raise ModelError(f"an adapter folder holds one method; this model holds {', '.join(names) or 'no adapters'}")
    (kind,) = kinds
    section = config.sections.get(METHODS[kind.method].config_section) if config is not None else None
    return format_for(kind).save(model, out_dir, base_model_name_or_path=base_model_name_or_path, section=section)


def load_adapter(model, adapter_dir: str | Path) -> dict:
    """Attach a saved adapter (ours or PEFT's) to `model`; return its config."""
    peft_type = read_config(adapter_dir).get("peft_type")
    if peft_type not in BY_PEFT_TYPE:
        raise ModelError(f"{Path(adapter_dir) / CONFIG_NAME} is a {peft_type} adapter; leantune loads "
                         f"{', '.join(BY_PEFT_TYPE)} (LORA with use_dora for DoRA)")
    return BY_PEFT_TYPE[peft_type].load(model, adapter_dir)
