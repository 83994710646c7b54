"""Build the train/eval examples from a DataConfig, and plan the batches of each epoch.

    per source: records -> rename fields -> normalise -> tokenize + mask -> over-long policy
                -> drop untrainable -> split          (or all of it read back from the cache, cache.py)
    the train parts of all sources -> mix by weight (sources.py)
    epoch e: shuffle (random.Random(seed + e)) -> pack -> shuffle rows -> batch -> collate

Nothing is dropped silently: every skipped or truncated example is counted in the DataReport,
whose summary() is printed before training. The epoch plan is a pure function of
(examples, seed, epoch), so a resumed run regenerates it and continues at batch k of epoch e.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import DataConfig, RunConfig
from ..errors import DataError
from . import cache
from .formats import SkipExample, detect_format
from .packing import Row, collate, join, pack_indices
from .records import read_records
from .sources import Source, mix, rename_fields, sources_of
from .tokenize import IGNORE, Example, pad_id_for, tokenize_example, tokenizer_info

# Tokenizing shows a progress bar once it has taken this long (27,900 chat records took 33 CPU-s on the demo
# tokenizer, silent before); a small dataset finishes first and prints nothing.
PROGRESS_DELAY_S = 2.0

NO_TRAINED = "no trained tokens"
NO_TRAINED_AFTER_TRUNCATION = "no trained tokens left after truncation"
OVERLONG = "longer than max_length"


@dataclass
class SourceCount:
    """One source's part in the run (reported when there are several sources)."""

    path: str
    format: str
    examples: int  # kept after tokenization
    train: int  # in the training mix (repeated or sampled when the sources have weights)
    eval: int  # held out of this source
    weight: float | None = None
    cached: bool = False  # read from the tokenized-data cache

    def describe(self) -> str:
        weight = f", weight {self.weight:g}" if self.weight is not None else ""
        available = self.examples - self.eval
        how = " (repeated)" if self.train > available else " (a sample)" if self.train < available else ""
        return (f"{Path(self.path).name} ({self.format}{weight}): {self.examples:,} examples -> "
                f"{self.train:,} train{how}, {self.eval:,} eval")


@dataclass
class DataReport:
    """Counts over every record read (train and eval files together; before the mix repeats or cuts)."""

    format: str = ""
    records_read: int = 0
    examples_kept: int = 0
    train_examples: int = 0
    eval_examples: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated: int = 0
    max_length: int = 0
    total_tokens: int = 0
    trained_tokens: int = 0
    bos_count: int = 0  # BOS tokens over all kept examples
    eos_count: int = 0  # EOS tokens over all kept examples
    double_bos: int = 0  # examples starting with two BOS
    no_trained_stop: int = 0  # untruncated examples whose trained tokens hold no EOS/end-of-turn token
    sources: list[SourceCount] = field(default_factory=list)  # filled when there are several sources
    notes: list[str] = field(default_factory=list)

    _SUMMED = ("records_read", "examples_kept", "truncated", "total_tokens", "trained_tokens", "bos_count",
               "eos_count", "double_bos", "no_trained_stop")

    def counts(self) -> dict[str, Any]:
        """What one source's tokenization counted (stored beside its cached tokens)."""
        return {"format": self.format, "skipped": dict(self.skipped), **{k: getattr(self, k) for k in self._SUMMED}}

    def absorb(self, counts: dict[str, Any]) -> None:
        """Add one source's counts (see counts())."""
        if counts["format"] and counts["format"] not in self.format.split(" + "):
            self.format = f"{self.format} + {counts['format']}" if self.format else counts["format"]
        for reason, c in counts["skipped"].items():
            self.skipped[reason] = self.skipped.get(reason, 0) + c
        for k in self._SUMMED:
            setattr(self, k, getattr(self, k) + counts[k])

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1

    def add(self, example: Example, bos_id: int | None, eos_id: int | None, stop_ids: frozenset[int],
            truncated: bool = False) -> None:
        ids = example.input_ids
        self.examples_kept += 1
        self.total_tokens += len(ids)
        self.trained_tokens += example.num_trained
        counts = Counter(ids)
        self.bos_count += counts[bos_id] if bos_id is not None else 0
        self.eos_count += counts[eos_id] if eos_id is not None else 0
        if bos_id is not None and ids[:2] == [bos_id, bos_id]:
            self.double_bos += 1
        if not truncated and not any(t in stop_ids for t in example.labels):
            self.no_trained_stop += 1

    def summary(self) -> str:
        n = max(self.examples_kept, 1)
        skipped = sum(self.skipped.values())
        parts = [f"Data ({self.format}): {self.records_read:,} records -> {self.examples_kept:,} examples "
                 f"({self.train_examples:,} train, {self.eval_examples:,} eval)."]
        if skipped:
            why = ", ".join(f"{c:,} {r}" for r, c in sorted(self.skipped.items()))
            parts.append(f"Skipped {skipped:,}: {why}.")
        if self.truncated:
            parts.append(f"Truncated {self.truncated:,} to {self.max_length:,} tokens.")
        share = self.trained_tokens / max(self.total_tokens, 1)
        parts.append(f"{self.total_tokens:,} tokens, {self.trained_tokens:,} trained ({share:.0%}); "
                     f"per example {self.bos_count / n:.2f} BOS, {self.eos_count / n:.2f} EOS.")
        if self.sources:
            parts.append("Sources: " + "; ".join(s.describe() for s in self.sources) + ".")
        if self.double_bos:
            parts.append(f"Warning: {self.double_bos:,} examples start with a double BOS.")
        if self.no_trained_stop:
            parts.append(f"Warning: {self.no_trained_stop:,} examples train no EOS/end-of-turn token "
                         f"(the model does not learn to stop on them).")
        parts += self.notes
        return " ".join(parts)


@dataclass
class Prepared:
    train: list[Example]
    eval: list[Example]
    report: DataReport
    pad_id: int  # the id batches pad with (the tokenizer's pad, else EOS, else 0; see report.notes)


def build(cfg: DataConfig, tokenizer: Any, seed: int, save_cache: bool = False) -> Prepared:
    """Read, tokenize, mask, split and mix the data of `cfg`; raises DataError when nothing is trainable.

    Each source's tokens come from the cache when cfg.cache is on and its key matches (cache.py);
    save_cache=True (`leantune preprocess`) writes the cache of every source that missed.
    """
    srcs = sources_of(cfg)
    report = DataReport(max_length=cfg.max_length)
    info = tokenizer_info(tokenizer, cfg.chat_template)
    if info.template is None:
        report.notes.append("The tokenizer has no chat template: alpaca and prompt/completion use the plain "
                            "'### Instruction/### Response' prompt format.")
    pad_id, note = pad_id_for(tokenizer)
    if note:
        report.notes.append(note[0].upper() + note[1:] + ".")

    reader = _Reader(cfg, tokenizer, report, save_cache)
    parts, held, cached = [], [], []
    for i, src in enumerate(srcs):
        examples, hit = reader.examples(src, _key(cfg, i))
        train, evals = (examples, []) if cfg.eval_path else split(examples, cfg.eval_fraction, seed + i)
        parts.append(train)
        held.append(evals)
        cached.append(hit)
    weights = [s.weight for s in srcs] if srcs[0].weight is not None else None
    train, in_mix = mix(parts, weights, seed)
    if cfg.eval_path:
        evals, _ = reader.examples(Source(cfg.eval_path, cfg.format, cfg.split), "data.eval_path")
    else:
        evals = [e for part in held for e in part]
    if len(srcs) > 1:
        report.sources = [SourceCount(s.path, reader.formats[i], len(p) + len(h), n, len(h), s.weight, c)
                          for i, (s, p, h, n, c) in enumerate(zip(srcs, parts, held, in_mix, cached))]
    report.train_examples, report.eval_examples = len(train), len(evals)
    return Prepared(train, evals, report, pad_id)


def _key(cfg: DataConfig, i: int) -> str:
    """How errors name source i: the config key it came from."""
    if cfg.sources:
        return f"data.sources[{i}]"
    return f"data.path[{i}]" if isinstance(cfg.path, list) else "data.path"


class _Reader:
    """Tokenized examples of one source at a time, through the cache; counts go into `report`."""

    def __init__(self, cfg: DataConfig, tokenizer: Any, report: DataReport, save_cache: bool):
        self.cfg, self.tokenizer, self.report, self.save_cache = cfg, tokenizer, report, save_cache
        self.use_cache = cfg.cache or save_cache
        self.fingerprint = cache.tokenizer_fingerprint(tokenizer, cfg.chat_template) if self.use_cache else ""
        self.formats: list[str] = []  # the format each training source was read as, in order

    def examples(self, src: Source, key: str) -> tuple[list[Example], bool]:
        """The examples of `src` and whether they came from the cache."""
        records = None
        if self.use_cache and not Path(src.path).expanduser().is_dir():  # a folder: read_records says what to do
            if not Path(src.path).expanduser().exists():  # a hub dataset: its records stand in for the file
                records = read_records(src.path, src.split)
            digest = cache.source_key(src, self.cfg, self.fingerprint, records)
            file = cache.source_dir(self.cfg, src) / f"{digest}.safetensors"
            hit = cache.load(file, digest)
            if hit is not None:
                examples, counts = hit
                self._absorb(counts)
                self.report.notes.append(f"{key} ({Path(src.path).name}): tokens read from the cache {file.parent}.")
                return examples, True
            if not self.save_cache and file.parent.is_dir() and any(file.parent.glob("*.safetensors")):
                self.report.notes.append(f"{key} ({Path(src.path).name}): the cached tokens are out of date (the "
                                         f"file, the tokenizer or a data setting changed), so it was tokenized "
                                         f"again; run `leantune preprocess` to refresh the cache.")
        if records is None:
            records = read_records(src.path, src.split)
        part = DataReport(max_length=self.cfg.max_length)
        examples = _examples(rename_fields(records, src.fields, key), src.format, self.cfg, self.tokenizer, part, key)
        self._absorb(part.counts())
        if self.save_cache:
            cache.save(file, digest, src, examples, part.counts())
            self.report.notes.append(f"{key} ({Path(src.path).name}): {len(examples):,} examples cached in {file}.")
        return examples, False

    def _absorb(self, counts: dict[str, Any]) -> None:
        self.report.absorb(counts)
        self.formats.append(counts["format"])


def _progress(records: list[dict], key: str):
    from tqdm import tqdm

    return tqdm(records, desc=f"tokenizing {key}", unit="record", delay=PROGRESS_DELAY_S, mininterval=0.5,
                leave=False, disable=os.environ.get("RANK", "0") != "0")  # one bar under torchrun: rank 0's


def _examples(records: list[dict], fmt: str, cfg: DataConfig, tokenizer: Any, report: DataReport,
              key: str) -> list[Example]:
    fmt = detect_format(records) if fmt == "auto" else fmt
    report.format = fmt
    report.records_read += len(records)
    info = tokenizer_info(tokenizer, cfg.chat_template)
    out = []
    for i, record in enumerate(_progress(records, key)):
        try:
            ex = tokenize_example(record, fmt, tokenizer, cfg, index=i)
        except SkipExample as e:
            report.skip(e.reason)
            continue
        fitted = _fit(ex, cfg, report)
        if fitted is None:
            continue
        report.add(fitted, info.bos_id, info.eos_id, info.stop_ids, truncated=fitted is not ex)
        out.append(fitted)
    if not out:
        skipped = report.skipped
        why = ", ".join(f"{c} {r}" for r, c in skipped.items()) or "none were readable"
        if OVERLONG in skipped or NO_TRAINED_AFTER_TRUNCATION in skipped:
            also = ", set data.overlong: truncate" if OVERLONG in skipped else ""
            fix = f"raise data.max_length (now {cfg.max_length}){also} or check the format (read as {fmt})"
        else:  # empty replies, chats of user turns only: a longer max_length changes nothing
            fix = (f"give each example a non-empty reply to train on (an assistant turn, or the format's response "
                   f"field), or check the format (read as {fmt})")
        raise DataError(f"all {len(records)} examples of {key} were skipped: {why} — {fix}")
    return out


def _fit(ex: Example, cfg: DataConfig, report: DataReport) -> Example | None:
    """Apply data.overlong; drop (and count) examples with nothing to train."""
    if ex.num_trained == 0:
        report.skip(NO_TRAINED)
        return None
    if len(ex) <= cfg.max_length:
        return ex
    if cfg.overlong == "skip":
        report.skip(OVERLONG)
        return None
    ex = Example(ex.input_ids[: cfg.max_length], ex.labels[: cfg.max_length])
    if ex.num_trained == 0:
        report.skip(NO_TRAINED_AFTER_TRUNCATION)
        return None
    report.truncated += 1
    return ex


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out round(fraction * n) examples chosen with `seed` (at least 1 when fraction > 0 and n >= 2).

    Both parts keep the original order; the train part is never left empty.
    """
    n = len(examples)
    if fraction <= 0 or n < 2:
        return list(examples), []
    k = min(max(round(n * fraction), 1), n - 1)
    held = set(random.Random(seed).sample(range(n), k))
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


class EpochPlan(Sequence):
    """The batches of one epoch, in order; batch k is collated when it is read.

    Behaves like a read-only list of batch dicts (len, indexing, slicing, iteration). Each dict holds
    LongTensors (B, T) input_ids, labels and position_ids (packed) or attention_mask (unpacked), and
    "num_label_tokens": the number of targets after the causal shift, (labels[:, 1:] != -100).sum(), and
    "num_tokens": the real (non-padding) tokens of the batch.
    """

    def __init__(self, examples: Sequence[Example], groups: list[list[list[int]]], pad_id: int, packing: bool):
        self._examples, self._groups, self._pad_id, self._packing = examples, groups, pad_id, packing

    def __len__(self) -> int:
        return len(self._groups)

    def __getitem__(self, k: int | slice) -> Any:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        rows: list[Row] = [join([self._examples[i] for i in members]) for members in self._groups[k]]
        batch: dict[str, Any] = collate(rows, self._pad_id, self._packing)
        batch["num_label_tokens"] = shift_count(batch["labels"])
        batch["num_tokens"] = sum(len(r) for r in rows)  # real tokens, padding not counted
        return batch

    @property
    def num_label_tokens(self) -> int:
        """Targets in the whole epoch (without collating)."""
        return sum(sum(1 for x in self._examples[i].labels[1:] if x != IGNORE)
                   for g in self._groups for members in g for i in members)


def batches(examples: Sequence[Example], batch_size: int, max_length: int, packing: bool, pad_id: int,
            seed: int, epoch: int) -> EpochPlan:
    """The deterministic batch plan of `epoch`: shuffle with Random(seed + epoch), then either pack and
    batch the rows, or (unpacked) batch examples of similar length together.

    A batch may be smaller than batch_size (the last of a window). Unpacked rows are single examples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed + epoch)
    order = list(range(len(examples)))
    rng.shuffle(order)
    if packing:
        bins = pack_indices([len(examples[i]) for i in order], max_length)
        rows = [[order[j] for j in members] for members in bins]
        rng.shuffle(rows)  # best-fit decreasing sorts by length; don't start every epoch with the longest rows
        groups = [rows[s: s + batch_size] for s in range(0, len(rows), batch_size)]
    else:
        groups = _length_grouped(order, [len(e) for e in examples], batch_size, rng)
    return EpochPlan(examples, groups, pad_id, packing)


def batch_plan(cfg: RunConfig, examples: Sequence[Example], pad_id: int, epoch: int = 0) -> EpochPlan:
    """The batch plan a run trains (or evaluates) `examples` with in `epoch`: its batch size, max length,
    packing and seed, read from `cfg` in this one place. `pad_id` is `Prepared.pad_id`."""
    return batches(examples, cfg.train.batch_size, cfg.data.max_length, cfg.data.packing, pad_id,
                   seed=cfg.seed, epoch=epoch)


def _length_grouped(order: list[int], lengths: list[int], batch_size: int, rng: random.Random,
                    window: int = 64) -> list[list[list[int]]]:
    """Unpacked batches of similar lengths, so padding stays small: the shuffled order is cut into
    windows of `window` batches, each window sorted by length and cut into batches, then the batches
    are shuffled (the group_by_length idea of transformers' Trainer, deterministic per epoch)."""
    span = window * batch_size
    groups = []
    for s in range(0, len(order), span):
        chunk = sorted(order[s: s + span], key=lambda i: lengths[i])
        groups += [[[i] for i in chunk[b: b + batch_size]] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(groups)
    return groups


def shift_count(labels: torch.Tensor) -> int:
    """Targets after the causal shift: what the loss averages over."""
    return int((labels[:, 1:] != IGNORE).sum())
