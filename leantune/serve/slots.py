"""Adapter slots: the adapters registered by name, `max_loras` of them resident in the stacked slots of every
adapted Linear (batched_lora.py), the least recently used slot that no running row holds evicted to make room,
and a CPU cache of weights read from disk (`max_cpu_loras`) so a reload after eviction skips the disk."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from .adapter_folders import AdapterFolder, AdapterWeights, describe_adapter, read_weights
from .batched_lora import BatchContext, BatchedLoraLinear


class AdapterSlots:
    """The adapters a model serves, and which of them sit in its `max_loras` slots."""

    def __init__(self, model: nn.Module, *, max_loras: int, max_cpu_loras: int | None) -> None:
        if max_loras < 1:
            raise ConfigError(f"--max-loras must be >= 1, got {max_loras}")
        self.model = model
        self.max_loras = max_loras
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        self.ctx = BatchContext()
        self.layers: dict[str, BatchedLoraLinear] = {}
        self.adapters: dict[str, AdapterFolder] = {}
        self.slots: list[str | None] = [None] * max_loras               # slot -> adapter name
        self.slot_used: list[float] = [0.0] * max_loras                 # last use, for LRU
        self.cpu: OrderedDict[str, AdapterWeights] = OrderedDict()      # LRU of weights read from disk
        self.lock = threading.RLock()                                    # adapters and slots
        self.loads = 0                                                   # adapter reads from disk
        self.swap_seconds = 0.0
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        # the factors' dtype over a quantized base: the activations' (the embeddings'); a float base gives its own
        self.dtype = emb.weight.dtype if emb is not None else torch.float32

    def add_adapter(self, name: str, path: str | Path) -> AdapterFolder:
        """Register an adapter folder under `name` (checked now; its weights load into a slot on first use)."""
        folder = describe_adapter(name, path)
        weights = read_weights(folder)
        self._check_fits(folder, weights)
        with self.lock:
            if name in self.adapters:
                raise ConfigError(f"an adapter named {name!r} is already loaded; unload it first or pick another name")
            self.adapters[name] = folder
            self._cache_weights(name, weights)
        return folder

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise ConfigError(f"no adapter named {name!r} is loaded")
            del self.adapters[name]
            self.cpu.pop(name, None)
            # its slot is freed once no running row holds it (see _slot_for)

    def _check_fits(self, folder: AdapterFolder, weights: AdapterWeights) -> None:
        modules = dict(self.model.named_modules())
        for path, (a, b, _) in weights.factors.items():
            module = modules.get(path)
            base = module.base_layer if isinstance(module, BatchedLoraLinear) else module
            if not isinstance(base, nn.Linear) or (base.out_features, base.in_features) != (b.shape[0], a.shape[1]):
                raise ModelError(f"adapter {folder.name!r} ({folder.path}) was trained for a different base: it adapts "
                                 f"{path} as a {b.shape[0]}x{a.shape[1]} Linear, which this model lacks")

    def _cache_weights(self, name: str, weights: AdapterWeights) -> None:
        self.cpu[name] = weights
        self.cpu.move_to_end(name)
        while len(self.cpu) > self.max_cpu_loras:
            self.cpu.popitem(last=False)

    def resident(self) -> list[str]:
        return [n for n in self.slots if n is not None]

    def _slot_for(self, name: str, pinned: set[int]) -> int | None:
        """The slot holding `name`, loading it into the LRU free slot if needed; None when all are pinned."""
        if name in self.slots:
            return self.slots.index(name)
        free = [i for i in range(self.max_loras) if i not in pinned]
        if not free:
            return None
        slot = min(free, key=lambda i: (self.slots[i] in self.adapters, self.slot_used[i]))
        self._load_slot(slot, name)
        return slot

    def _load_slot(self, slot: int, name: str) -> None:
        t0 = time.perf_counter()
        weights = self.cpu.get(name)
        if weights is None:   # evicted from the CPU cache too: read it from disk again
            weights = read_weights(self.adapters[name])
            self.loads += 1
            self._cache_weights(name, weights)
        else:
            self.cpu.move_to_end(name)
        for path in weights.factors:
            if path not in self.layers:
                layer = BatchedLoraLinear(self.model.get_submodule(path), self.max_loras, self.ctx, self.dtype)
                parent, _, child = path.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)
                self.layers[path] = layer
        for path, layer in self.layers.items():
            a, b, m = weights.factors.get(path, (None, None, None))
            layer.put(slot, a, b, weights.scaling, m)
        self.slots[slot] = name
        self.swap_seconds = time.perf_counter() - t0
