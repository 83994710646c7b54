"""A few held-out batches of a run's data, tokenized as training tokenized them, without tokenizing the rest.

Training splits the tokenized examples with `data.dataset.split` (seeded by the run's seed) unless the
run has a data.eval_path. Re-running that on the whole dataset to score four batches costs a full
tokenization of a possibly large file; here the split is drawn over the records instead, and only the
held-out records are tokenized, in order, until `limit` batches are full. It is the run's own eval split
exactly when no record was skipped during training (the usual case: a skipped record shifts the draw).
"""

from __future__ import annotations

from ..config import RunConfig
from ..data.dataset import batches, split
from ..data.formats import SkipExample, detect_format
from ..data.records import read_records
from ..data.tokenize import Example, pad_id_for, tokenize_example


def held_out_batches(cfg: RunConfig, tokenizer, limit: int) -> tuple[list[dict], str, int]:
    """(up to `limit` batches, which data they came from, how many records were tokenized)."""
    data = cfg.data
    if data.eval_path:
        records, where = read_records(data.eval_path, data.split), "eval_path"
    else:
        records = read_records(data.path, data.split)
        train, held = split(list(range(len(records))), data.eval_fraction, cfg.seed)
        where = "eval split" if held else "training data (no eval split)"
        records = [records[i] for i in (held or train)]
    fmt = detect_format(records) if data.format == "auto" else data.format
    wanted = limit * cfg.train.batch_size
    examples: list[Example] = []
    tokenized = 0
    for i, record in enumerate(records):
        if len(examples) >= wanted and (not data.packing or _tokens(examples) >= wanted * data.max_length):
            break
        tokenized += 1
        try:
            ex = tokenize_example(record, fmt, tokenizer, data, index=i)
        except SkipExample:
            continue
        ex = Example(ex.input_ids[: data.max_length], ex.labels[: data.max_length])
        if ex.num_trained:
            examples.append(ex)
    pad_id, _ = pad_id_for(tokenizer)
    plan = batches(examples, cfg.train.batch_size, data.max_length, data.packing, pad_id, seed=cfg.seed, epoch=0)
    return list(plan[:limit]), where, tokenized


def _tokens(examples: list[Example]) -> int:
    return sum(len(e) for e in examples)
