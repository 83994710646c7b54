"""Build the train/eval examples from a DataConfig, and plan the batches of each epoch.

    records -> normalise -> tokenize + mask -> over-long policy -> drop untrainable -> split
    epoch e: shuffle (random.Random(seed + e)) -> pack -> shuffle rows -> batch -> collate

Nothing is dropped silently: every skipped or truncated example is counted in the DataReport,
whose summary() is printed before training. The epoch plan is a pure function of
(examples, seed, epoch), so a resumed run regenerates it and continues at batch k of epoch e.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import DataConfig, RunConfig
from ..errors import DataError
from .formats import SkipExample, detect_format
from .packing import Row, collate, join, pack_indices
from .records import read_records
from .tokenize import IGNORE, Example, pad_id_for, tokenize_example, tokenizer_info

NO_TRAINED = "no trained tokens"
NO_TRAINED_AFTER_TRUNCATION = "no trained tokens left after truncation"
OVERLONG = "longer than max_length"


@dataclass
class DataReport:
    """Counts over every record read (train and eval files together)."""

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
    notes: list[str] = field(default_factory=list)

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


def build(cfg: DataConfig, tokenizer: Any, seed: int) -> Prepared:
    """Read, tokenize, mask and split the data of `cfg`; raises DataError when nothing is trainable."""
    if cfg.path is None:
        raise DataError("data.path is not set; point it at a .jsonl/.json/.csv/.parquet file")
    report = DataReport(max_length=cfg.max_length)
    info = tokenizer_info(tokenizer, cfg.chat_template)
    if info.template is None:
        report.notes.append("The tokenizer has no chat template: alpaca and prompt/completion use the plain "
                            "'### Instruction/### Response' prompt format.")
    pad_id, note = pad_id_for(tokenizer)
    if note:
        report.notes.append(note[0].upper() + note[1:] + ".")

    train = _examples(cfg.path, cfg, tokenizer, report, "data.path")
    if cfg.eval_path:
        evals = _examples(cfg.eval_path, cfg, tokenizer, report, "data.eval_path")
    else:
        train, evals = split(train, cfg.eval_fraction, seed)
    report.train_examples, report.eval_examples = len(train), len(evals)
    return Prepared(train, evals, report, pad_id)


def _examples(path: str, cfg: DataConfig, tokenizer: Any, report: DataReport, key: str) -> list[Example]:
    records = read_records(path, cfg.split)
    fmt = detect_format(records) if cfg.format == "auto" else cfg.format
    report.format = report.format or fmt
    report.records_read += len(records)
    info = tokenizer_info(tokenizer, cfg.chat_template)
    before = dict(report.skipped)
    out = []
    for i, record in enumerate(records):
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
        skipped = {r: c - before.get(r, 0) for r, c in report.skipped.items() if c > before.get(r, 0)}
        why = ", ".join(f"{c} {r}" for r, c in skipped.items()) or "none were readable"
        also = ", set data.overlong: truncate" if OVERLONG in skipped else ""
        raise DataError(f"all {len(records)} examples of {key} were skipped: {why} — raise data.max_length "
                        f"(now {cfg.max_length}){also} or check the format (read as {fmt})")
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
