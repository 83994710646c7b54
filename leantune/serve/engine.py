"""The serving engine: one base model, many adapters, continuous batching. Torch only (no HTTP here).

Each step of `Engine.step()`:
  1. admit waiting requests while the batch has room and their adapter has (or can take) a slot (slots.py:
     LRU eviction beyond max_loras, weights from the CPU cache or from disk);
  2. prefill the admitted prompts together (left-padded, one forward) and append their KV to the batch
     (kv_cache.py);
  3. one decode forward for every running row, whatever adapter each uses (batched_lora.py);
  4. sample each row with its own settings and generator (sampling.py) and stream its new text (stream_text.py);
     rows that finish or whose client went away leave the batch, and their KV rows are dropped.
"""

from __future__ import annotations

import queue
import threading
import time

import torch
from torch import nn

from ..errors import ConfigError
from .adapter_folders import (NAME_RE, NOT_SERVED, AdapterFolder, AdapterWeights, check_name,  # noqa: F401 (re-exported)
                              describe_adapter, finished_runs, read_weights)
from .kv_cache import BatchKV
from .request import Request, Sampling
from .sampling import check_sampling, pick_token  # noqa: F401 (re-exported)
from .slots import AdapterSlots
from .stream_text import emit_text


class Engine(AdapterSlots):
    """A base model with `max_loras` adapter slots, serving Requests in continuous batches."""

    def __init__(self, model: nn.Module, tokenizer, *, max_loras: int = 8, max_cpu_loras: int | None = None,
                 max_batch: int = 32) -> None:
        super().__init__(model.eval().requires_grad_(False), max_loras=max_loras, max_cpu_loras=max_cpu_loras)
        self.tok = tokenizer
        self.max_batch = max_batch
        self.device = next(model.parameters()).device
        self.waiting: queue.Queue[Request] = queue.Queue()
        self.pending: list[Request] = []
        self.running: list[Request] = []
        self.kv = BatchKV()
        self.max_len = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 20)
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos]) - {None}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()

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
        self.kv.add(cache, mask, alone=not self.running)
        self.running.extend(new)
        self._sample(new, out.logits[:, -1, :], offset=len(self.running) - len(new))

    def _keep_rows(self, keep: list[int]) -> None:
        """Only these rows stay in the batch (and in the KV cache)."""
        self.running = [self.running[i] for i in keep]
        self.kv.keep(keep)

    @torch.no_grad()
    def _decode(self) -> None:
        last = torch.tensor([[r.tokens[-1]] for r in self.running], device=self.device)          # (B, 1)
        positions = self.kv.next_column()                                                          # (B, 1)
        self._rows(self.running)
        out = self.model(input_ids=last, attention_mask=self.kv.mask, position_ids=positions,
                         cache=self.kv.cache, use_cache=True)
        self._sample(self.running, out.logits[:, -1, :], offset=0)

    def _sample(self, rows: list[Request], logits: torch.Tensor, offset: int) -> None:
        done = []
        for i, r in enumerate(rows):
            token = pick_token(logits[i].float().cpu(), r.sampling, r.generator)
            r.tokens.append(token)
            if r.first_token_at is None:
                r.first_token_at = time.perf_counter()
            reason = emit_text(self.tok, self.eos, r, token)
            if reason is not None:
                done.append(offset + i)
                r.emit("done", {"finish_reason": reason, "prompt_tokens": len(r.prompt),
                                "completion_tokens": len(r.tokens)})
        if done:
            self._keep_rows([i for i in range(len(self.running)) if i not in set(done)])

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
                self.running, self.pending = [], []
                self.kv.clear()

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

