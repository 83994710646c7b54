"""The pieces of train/setup.py that need no model: the micro-batch stream and the output_dir checks."""

from __future__ import annotations

import copy

import pytest
import torch

from leantune.config import from_dict
from leantune.data.dataset import DataReport, Prepared, batch_plan
from leantune.data.tokenize import Example
from leantune.errors import ConfigError
from leantune.train.setup import Batches, check_run_dir
from leantune.train.state import Progress


def run_cfg(packing: bool):
    return from_dict({"model": "m", "seed": 3, "data": {"path": "d.jsonl", "max_length": 16, "packing": packing},
                      "train": {"batch_size": 3}})


def prepared(n: int = 11) -> Prepared:
    examples = [Example(list(range(1, 4 + i % 7)), list(range(1, 4 + i % 7))) for i in range(n)]
    return Prepared(examples, [], DataReport(), pad_id=0)


@pytest.mark.parametrize("packing", [True, False])
def test_batches_run_through_the_epoch_plans_in_order_and_resume_where_progress_points(packing):
    cfg, data = run_cfg(packing), prepared()
    plans = [batch_plan(cfg, data.train, data.pad_id, epoch=e) for e in range(4)]
    expected = [b for plan in plans for b in plan[: len(plans[0])]]
    stream, progress = Batches(cfg, data), Progress()
    got = []
    for i in range(len(expected)):
        if i == len(expected) // 2 + 1:  # a resumed run: a new stream from the saved position
            stream, progress = Batches(cfg, data), copy.deepcopy(progress)
        got.append(stream.next(progress))
    assert len(got) > 3 * len(plans[0])  # the stream crossed three epoch boundaries
    for a, b in zip(got, expected):
        assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert progress.epoch == 3 and progress.batch_index == len(plans[0])


def test_an_existing_run_is_refused_and_a_missing_one_cannot_resume(tmp_path):
    (tmp_path / "run" / "checkpoints" / "step-000002").mkdir(parents=True)
    with pytest.raises(ConfigError, match="--resume"):
        check_run_dir(tmp_path / "run", resume=False)
    assert check_run_dir(tmp_path / "run", resume=True) == [tmp_path / "run" / "checkpoints" / "step-000002"]
    with pytest.raises(ConfigError, match="no checkpoint"):
        check_run_dir(tmp_path / "new", resume=True)
    assert check_run_dir(tmp_path / "new" / "deeper", resume=False) == []  # a folder yet to be made is fine
