"""train.auto_fit (`leantune train --fit`): the planner sizes micro-batch, accumulation and checkpointing
to a memory budget before the run, keeps the global batch, and the run records predicted vs measured peak."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest

from leantune.cli.main import main
from leantune.config import RunConfig
from leantune.errors import ConfigError
from leantune.plan.devices import Device
from leantune.plan.estimate import MiB, Setup, estimate
from leantune.plan.fit import choose
from leantune.plan.shape import read_config, shape_of, trainable_of

WORDS = "the quick brown fox jumps over lazy dog one two three four five six seven eight nine ten".split()


@pytest.fixture(scope="module")
def wide_llama(wide_llama_dir):
    """conftest's 2-layer Llama at hidden 256: a micro-batch's activations dwarf the noise of RSS."""
    return wide_llama_dir


def _cpu(budget: int) -> Device:
    return Device("budget", budget, None, None, "test", "cpu", bf16=False)


def _plan(model_dir, batch=8, seq=256):
    config = read_config(model_dir)
    shape = shape_of(config, "wide")
    trained = trainable_of(config, "lora", RunConfig())
    base = Setup(method="lora", batch=batch, seq=seq, grad_accum=1, dtype_bytes=4, device="cpu")
    return shape, trained, base


def test_choose_keeps_the_global_batch_and_fits_the_budget(wide_llama):
    shape, trained, base = _plan(wide_llama)
    full = estimate(shape, base, trained, runtime=0).peak
    half = estimate(shape, replace(base, batch=4, grad_accum=2), trained, runtime=0).peak
    assert half < full
    fit = choose(shape, trained, base, _cpu((full + half) // 2), runtime=0)
    s = fit.chosen.setup
    assert s.batch * s.grad_accum == 8 and fit.chosen.peak <= (full + half) // 2
    assert (s.batch, s.grad_accum, s.checkpointing) == (4, 2, False)  # the largest micro-batch that fits, unchecked
    assert fit.configured.peak == full
    roomy = choose(shape, trained, base, _cpu(10 * full), runtime=0)
    assert (roomy.chosen.setup.batch, roomy.chosen.setup.checkpointing) == (8, False)  # nothing to change


def test_checkpointing_is_chosen_when_the_smallest_micro_batch_alone_does_not_fit(wide_llama):
    shape, trained, base = _plan(wide_llama, batch=1, seq=1024)
    off = estimate(shape, base, trained, runtime=0).peak
    on = estimate(shape, replace(base, checkpointing=True), trained, runtime=0).peak
    assert on < off
    fit = choose(shape, trained, base, _cpu((on + off) // 2), runtime=0)
    assert fit.chosen.setup.checkpointing and fit.chosen.setup.batch == 1


def test_nothing_fits_is_one_line_naming_the_fix(wide_llama):
    shape, trained, base = _plan(wide_llama)
    with pytest.raises(ConfigError, match="nothing fits .* try quant.bits 4"):
        choose(shape, trained, base, _cpu(1 * MiB), runtime=0)


def _text_data(path, n=80, seed=0):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(40))}) + "\n")
    return path


def test_cli_fit_sizes_the_run_and_summary_records_predicted_and_measured_peak(wide_llama, tmp_path, capsys):
    """A real run on CPU under a budget between the predicted peaks of micro-batch 8 and 4 (this process's
    resident set included, as the CLI sees it): it trains 4 x 2 and writes both peaks to summary.json."""
    from leantune.plan.estimate import runtime_bytes

    shape, trained, base = _plan(wide_llama)
    rt = runtime_bytes(base)
    full = estimate(shape, base, trained, runtime=rt).peak
    half = estimate(shape, replace(base, batch=4, grad_accum=2), trained, runtime=rt).peak
    assert full - half > 20 * MiB, (full, half)  # wide enough a gap for RSS to move a little meanwhile
    budget = (full + half) // 2
    out = tmp_path / "run"
    rc = main(["train", "--model", str(wide_llama), "--data.path", str(_text_data(tmp_path / "d.jsonl")),
               "--data.format", "text", "--data.max_length", "256", "--output_dir", str(out), "--dtype", "fp32",
               "--device", "cpu",
               "--train.batch_size", "8", "--train.max_steps", "1", "--train.progress", "false",
               "--train.tensorboard", "false", "--train.eval_every", "0", "--lora.rank", "4",
               "--fit", "--train.fit_memory", f"{budget / MiB:.0f}MB"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "auto_fit: sized to fit: LoRA, AdamW, no checkpointing, micro-batch 4 x 2 accumulation" in printed
    summary = json.loads((out / "summary.json").read_text())
    fit = summary["fit"]
    assert (fit["batch_size"], fit["grad_accum"], fit["gradient_checkpointing"]) == (4, 2, False)
    assert fit["configured"]["batch_size"] == 8 and fit["configured"]["predicted_peak_bytes"] > fit["budget_bytes"]
    assert fit["measured_peak_bytes"] == summary["memory"]["mem_peak_bytes"] > 0
    assert fit["predicted_peak_bytes"] <= fit["budget_bytes"]
    saved = (out / "config.yaml").read_text()
    assert "batch_size: 4" in saved and "grad_accum: 2" in saved  # the run's config is what ran
    # the recorded prediction is the planner's for the config that ran (its runtime is the machine's measured
    # baseline, cached, so planning again gives the same bytes), and the measured peak is of the same order
    from leantune.config import from_dict, load_yaml
    from leantune.plan.fit import fit_run

    again = fit_run(from_dict(load_yaml(out / "config.yaml")), "cpu")
    assert again.chosen.peak == fit["predicted_peak_bytes"]
    assert 0.5 < fit["measured_peak_bytes"] / fit["predicted_peak_bytes"] < 2


def test_fit_memory_that_is_no_size_is_one_line_exit_2(wide_llama, tmp_path, capsys):
    rc = main(["train", "--model", str(wide_llama), "--data.path", str(_text_data(tmp_path / "d.jsonl", n=8)),
               "--output_dir", str(tmp_path / "run"), "--fit", "--train.fit_memory", "lots"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown GPU 'lots'" in err and err.count("\n") == 1
