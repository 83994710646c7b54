"""The serving engine: one base model, many adapters, continuous batching. Torch only (no HTTP here).

Each step of `Engine.step()`:
  1. admit waiting requests while the batch has room and their adapter has (or can take) a slot:
     an adapter not resident is read from the CPU cache or from disk into the least recently used slot
     that no running row holds (LRU eviction beyond max_loras);
  2. prefill the admitted prompts together (left-padded, one forward) and append their KV to the batch;
  3. one decode forward for every running row, whatever adapter each uses (batched_lora.py);
  4. sample each row with its own settings and generator; rows that finish or whose client went away
     leave the batch, and their KV rows are dropped.

The KV cache is one transformers DynamicCache for the batch, left-padded: rows that joined later carry
masked zero columns at the left, and columns no row needs any more are trimmed when rows leave.
"""

from __future__ import annotations

import itertools
import math
import queue
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.format import CONFIG_NAME, read_config
from ..adapters.lora import lora_scaling
from ..checkpoint.peft_format import MAGNITUDE, read_lora
from ..checkpoint.run_folder import SUMMARY, find_model_and_adapter, is_run_folder, run_info
from ..data.tokenize import resolve_chat_template
from ..errors import ConfigError, ModelError
from .batched_lora import BatchContext, BatchedLoraLinear

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
NOT_SERVED = {  # peft_type -> why it is refused, and what to do instead
    "IA3": "IA3 scales activations per adapter (not a low-rank delta); merge it with `leantune merge` and serve the result",
    "PROMPT_TUNING": "prompt tuning prepends virtual tokens, which would change every row's positions in a shared batch; "
                     "merge is impossible, serve it with `leantune generate` instead",
    "PREFIX_TUNING": "prefix tuning adds its own KV prefix per layer, which the shared batch cache does not carry; "
                     "serve it with `leantune generate` instead",
    "P_TUNING": "p-tuning prepends virtual tokens; serve it with `leantune generate` instead",
}


# ---------------------------------------------------------------------------------------------
# Adapters as read from disk


@dataclass
class AdapterFolder:
    """A served adapter by name: where it lives and how its run prompted the model."""

    name: str
    path: Path
    rank: int
    method: str                       # lora | dora
    chat_template: str | None         # the run's data.chat_template resolved (None: the base tokenizer's)
    system_prompt: str | None


@dataclass
class AdapterWeights:
    """{module path: (A (r, in), B (out, r), magnitude (out,) or None)} and the scale s."""

    factors: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]
    scaling: float


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return name


def describe_adapter(name: str, path: str | Path) -> AdapterFolder:
    """Check an adapter folder (or a run folder holding one) without loading weights: a one-line error names
    what is wrong (not an adapter, a method not served, a damaged config)."""
    check_name(name)
    p = Path(path)
    if is_run_folder(p):
        _, adapter = find_model_and_adapter(str(p))
        if adapter is None:
            raise ModelError(f"{p} holds a whole model (full/freeze tuning), not an adapter; serve it as the base")
        p = adapter
    if not (p / CONFIG_NAME).is_file():
        raise ModelError(f"{p} has no {CONFIG_NAME}: not an adapter folder (point at a run folder or its adapter/)")
    config = read_config(p)
    kind = config.get("peft_type")
    if kind in NOT_SERVED:
        raise ModelError(f"adapter {name!r} ({p}) is not served: {NOT_SERVED[kind]}")
    read_lora(p)   # the full check (config and tensor names), so a damaged folder fails here, not mid-request
    info = run_info(p)
    template = resolve_chat_template(None, info.chat_template) if info is not None and info.chat_template else None
    return AdapterFolder(name, p, int(config["r"]), "dora" if config.get("use_dora") else "lora", template,
                         info.system_prompt if info is not None else None)


def read_weights(folder: AdapterFolder) -> AdapterWeights:
    config, by_module = read_lora(folder.path)
    scaling = lora_scaling(int(config["r"]), config["lora_alpha"], bool(config.get("use_rslora", False)))
    return AdapterWeights({p: (f["lora_A"].float(), f["lora_B"].float(), f.get(MAGNITUDE))
                           for p, f in by_module.items()}, scaling)


def finished_runs(root: str | Path) -> dict[str, Path]:
    """{run name: run folder} for every finished run (summary.json written) directly under `root`."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"--adapters {root}: no such folder; point it at the folder holding your run folders")
    return {d.name: d for d in sorted(root.iterdir())
            if d.is_dir() and is_run_folder(d) and (d / SUMMARY).is_file() and (d / "adapter").is_dir()}


# ---------------------------------------------------------------------------------------------
# Requests


@dataclass
class Sampling:
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class Request:
    prompt: list[int]
    adapter: str | None                         # None: the base alone
    sampling: Sampling
    emit: Callable[[str, dict], None]           # ("token", {"text"}) / ("done", {"finish_reason", ...}) / ("error", ...)
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False                     # set from another thread: the client went away
    created: float = field(default_factory=time.perf_counter)
    # engine state
    tokens: list[int] = field(default_factory=list)
    sent: int = 0                               # characters of the decoded text already emitted
    generator: torch.Generator | None = None
    first_token_at: float | None = None

    def cancel(self) -> None:
        self.cancelled = True


# ---------------------------------------------------------------------------------------------
# The engine


class Engine:
    """A base model with `max_loras` adapter slots, serving Requests in continuous batches."""

    def __init__(self, model: nn.Module, tokenizer, *, max_loras: int = 8, max_cpu_loras: int | None = None,
                 max_batch: int = 32) -> None:
        if max_loras < 1:
            raise ConfigError(f"--max-loras must be >= 1, got {max_loras}")
        self.model = model.eval().requires_grad_(False)
        self.tok = tokenizer
        self.max_loras = max_loras
        self.max_cpu_loras = max(max_cpu_loras or max_loras, max_loras)
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.ctx = BatchContext()
        self.layers: dict[str, BatchedLoraLinear] = {}
        self.adapters: dict[str, AdapterFolder] = {}
        self.slots: list[str | None] = [None] * max_loras               # slot -> adapter name
        self.slot_used: list[float] = [0.0] * max_loras                 # last use, for LRU
        self.cpu: OrderedDict[str, AdapterWeights] = OrderedDict()      # LRU of weights read from disk
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.pending: list[Request] = []
        self.running: list[Request] = []
        self.cache = None
        self.mask: torch.Tensor | None = None                           # (B, L) 1 = a real token
        self.lock = threading.RLock()                                    # adapters and slots
        self.loads = 0                                                   # adapter reads from disk
        self.swap_seconds = 0.0
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

    # -- adapters ---------------------------------------------------------------------------------

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
                layer = BatchedLoraLinear(self.model.get_submodule(path), self.max_loras, self.ctx)
                parent, _, child = path.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, layer)
                self.layers[path] = layer
        for path, layer in self.layers.items():
            a, b, m = weights.factors.get(path, (None, None, None))
            layer.put(slot, a, b, weights.scaling, m)
        self.slots[slot] = name
        self.swap_seconds = time.perf_counter() - t0

    # -- requests ---------------------------------------------------------------------------------

    def submit(self, request: Request) -> Request:
        """Queue a request (any thread). Unknown adapters and over-long prompts are refused here."""
        if request.adapter is not None and request.adapter not in self.adapters:
            raise ConfigError(f"no adapter named {request.adapter!r} is loaded")
        if not request.prompt:
            raise ConfigError("the prompt is empty")
        if len(request.prompt) + request.sampling.max_tokens > self.max_len:
            raise ConfigError(f"prompt ({len(request.prompt)} tokens) + max_tokens ({request.sampling.max_tokens}) "
                              f"is longer than the model's context ({self.max_len}); shorten one of them")
        seed = request.sampling.seed
        request.generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (1 << 63))
        self.waiting.put(request)
        self._wake.set()
        return request

    def queue_depth(self) -> int:
        return self.waiting.qsize() + len(self.pending)

    def busy(self) -> bool:
        return bool(self.running or self.pending or not self.waiting.empty())

    def step(self) -> None:
        """Admit, prefill, decode one token for every running row."""
        while True:
            try:
                self.pending.append(self.waiting.get_nowait())
            except queue.Empty:
                break
        self._drop_cancelled()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self.running:
            self._decode()

    def _drop_cancelled(self) -> None:
        for r in [r for r in self.pending if r.cancelled]:
            self.pending.remove(r)
        keep = [i for i, r in enumerate(self.running) if not r.cancelled]
        if len(keep) < len(self.running):
            self._keep_rows(keep)

    def _admit(self) -> list[Request]:
        admitted = []
        with self.lock:
            pinned = {self.slots.index(r.adapter) for r in self.running if r.adapter in self.slots}
            for r in list(self.pending):
                if len(self.running) + len(admitted) >= self.max_batch:
                    break
                if r.adapter is not None:
                    if r.adapter not in self.adapters:
                        self.pending.remove(r)
                        r.emit("error", {"message": f"adapter {r.adapter!r} was unloaded"})
                        continue
                    slot = self._slot_for(r.adapter, pinned)
                    if slot is None:
                        continue      # every slot is held by running rows: wait for one to finish
                    pinned.add(slot)
                    self.slot_used[slot] = time.monotonic()
                self.pending.remove(r)
                admitted.append(r)
        return admitted

    def _rows(self, requests: list[Request]) -> None:
        self.ctx.set([self.slots.index(r.adapter) if r.adapter is not None else -1 for r in requests], self.device)

    @torch.no_grad()
    def _prefill(self, new: list[Request]) -> None:
        from transformers import DynamicCache

        width = max(len(r.prompt) for r in new)
        ids = torch.full((len(new), width), self.tok.pad_token_id or 0, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        for i, r in enumerate(new):          # left padding: every prompt ends at the last column
            ids[i, width - len(r.prompt):] = torch.tensor(r.prompt)
            mask[i, width - len(r.prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)                # (B, T)
        self._rows(new)
        cache = DynamicCache()
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                         use_cache=True)
        for layer in cache.layers:   # padded columns hold junk KV: zero it so it cannot leak (masked anyway)
            layer.keys.mul_(mask[:, None, :, None].to(layer.keys.dtype))
            layer.values.mul_(mask[:, None, :, None].to(layer.values.dtype))
        self._join(cache, mask)
        self.running.extend(new)
        self._sample(new, out.logits[:, -1, :], offset=len(self.running) - len(new))

    def _join(self, cache, mask: torch.Tensor) -> None:
        """Append the new rows' KV to the batch cache, left-padding whichever is shorter."""
        if self.cache is None or not self.running:
            self.cache, self.mask = cache, mask
            return
        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            for attr in ("keys", "values"):
                a, b = getattr(mine, attr), getattr(theirs, attr)              # (B, H, L, D)
                setattr(mine, attr, torch.cat([F.pad(a, (0, 0, width - old, 0)), F.pad(b, (0, 0, width - new, 0))]))
        self.mask = torch.cat([F.pad(self.mask, (width - old, 0)), F.pad(mask, (width - new, 0))])

    def _keep_rows(self, keep: list[int]) -> None:
        """Only these rows stay in the batch; KV columns no remaining row uses are trimmed from the left."""
        self.running = [self.running[i] for i in keep]
        if not keep:
            self.cache, self.mask = None, None
            return
        index = torch.tensor(keep, device=self.device)
        mask = self.mask.index_select(0, index)
        start = int((mask.sum(0) > 0).nonzero()[0]) if mask.any() else 0
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]

    @torch.no_grad()
    def _decode(self) -> None:
        last = torch.tensor([[r.tokens[-1]] for r in self.running], device=self.device)          # (B, 1)
        positions = self.mask.sum(-1, keepdim=True)                                                # (B, 1)
        self.mask = F.pad(self.mask, (0, 1), value=1)
        self._rows(self.running)
        out = self.model(input_ids=last, attention_mask=self.mask, position_ids=positions,
                         cache=self.cache, use_cache=True)
        self._sample(self.running, out.logits[:, -1, :], offset=0)

    def _sample(self, rows: list[Request], logits: torch.Tensor, offset: int) -> None:
        done = []
        for i, r in enumerate(rows):
            token = pick_token(logits[i].float().cpu(), r.sampling, r.generator)
            r.tokens.append(token)
            if r.first_token_at is None:
                r.first_token_at = time.perf_counter()
            reason = self._emit_text(r, token)
            if reason is not None:
                done.append(offset + i)
                r.emit("done", {"finish_reason": reason, "prompt_tokens": len(r.prompt),
                                "completion_tokens": len(r.tokens)})
        if done:
            self._keep_rows([i for i in range(len(self.running)) if i not in set(done)])

    def _emit_text(self, r: Request, token: int) -> str | None:
        """Send the new text (holding back what may still turn into a stop string); the finish reason or None."""
        eos = token in self.eos
        ids = r.tokens[:-1] if eos else r.tokens
        text = self.tok.decode(ids, skip_special_tokens=True)
        stops = [s for s in r.sampling.stop if s]
        hit = min((text.find(s, max(0, r.sent - len(s) + 1)) for s in stops if s in text[max(0, r.sent - len(s) + 1):]),
                  default=-1)
        if hit >= 0:
            text, reason = text[:hit], "stop"
        elif eos:
            reason = "stop"
        elif len(r.tokens) >= r.sampling.max_tokens:
            reason = "length"
        else:
            reason = None
            hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
            if text.endswith("\ufffd"):      # half of a multi-byte character: wait for the rest
                text = text[:-1]
        if len(text) > r.sent:
            r.emit("token", {"text": text[r.sent:]})
            r.sent = len(text)
        return reason

    # -- the background thread --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="leantune-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            if not self.busy():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # a bug must not leave clients hanging: fail the batch, keep serving
                for r in self.running + self.pending:
                    r.emit("error", {"message": f"engine error: {type(e).__name__}: {e}"})
                self.running, self.pending, self.cache, self.mask = [], [], None, None

    def generate(self, prompt: list[int], adapter: str | None = None, sampling: Sampling | None = None) -> dict:
        """Run one request to the end (without the thread: steps the engine itself). For tests and scripts."""
        result = {"text": ""}
        r = self.submit(Request(prompt, adapter, sampling or Sampling(), lambda kind, data: _collect(result, kind, data)))
        while "finish_reason" not in result and "error" not in result:
            self.step()
        return {**result, "tokens": r.tokens}


def _collect(into: dict, kind: str, data: dict) -> None:
    if kind == "token":
        into["text"] += data["text"]
    elif kind == "error":
        into["error"] = data["message"]
    else:
        into.update(data)


def pick_token(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None) -> int:
    """Greedy at temperature 0; else softmax(logits / T) cut to the smallest top-p set, sampled with `generator`."""
    if s.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < s.top_p          # the tokens needed to reach top_p mass
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(max_tokens, temperature, top_p, stop, seed, *, cap: int) -> Sampling:
    """A Sampling from request fields, or a ConfigError naming the field (the API turns it into a 400)."""
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ConfigError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if max_tokens > cap:
        raise ConfigError(f"max_tokens {max_tokens} is above this server's cap ({cap}); ask for fewer "
                          "or start the server with a larger --max-tokens")
    if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2 or math.isnan(temperature):
        raise ConfigError(f"temperature must be between 0 and 2, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
    stop = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ConfigError("stop must be a string or a list of at most 4 strings")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return Sampling(max_tokens, float(temperature), float(top_p), stop, seed)
