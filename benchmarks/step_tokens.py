"""Run a script (or `-m module`) and append the real tokens of each training step it takes, one line per
step, to the file named by $LEANTUNE_STEP_TOKENS_FILE. bench_lora.py wraps both sides with it, so that
each is credited with the tokens of exactly the steps it timed (not an epoch mean: the batches of a few
steps differ from it by 3-23% on the CPU fixture).

    peer      transformers.Trainer.training_step: the batch's attention_mask sum (padding not counted)
    leantune  leantune.train.loop._accumulate_gradients: its micro-batches' num_tokens

    LEANTUNE_STEP_TOKENS_FILE=t.txt python benchmarks/step_tokens.py -m leantune.cli.main train ...
"""

import os
import sys

from launch import run_command


def _record(n: int) -> None:
    with open(os.environ["LEANTUNE_STEP_TOKENS_FILE"], "a") as f:
        f.write(f"{n}\n")


def _patch_trainer() -> None:
    try:
        from transformers import Trainer
    except ImportError:
        return
    original = Trainer.training_step

    def training_step(self, model, inputs, *args, **kwargs):
        mask = inputs.get("attention_mask")
        _record(int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel()))
        return original(self, model, inputs, *args, **kwargs)

    Trainer.training_step = training_step


def _patch_leantune() -> None:
    try:
        from leantune.train import loop
    except ImportError:
        return
    original = loop._accumulate_gradients

    def accumulate(model, micro, *args, **kwargs):
        _record(sum(b.get("num_tokens", int(b["input_ids"].numel())) for b in micro))
        return original(model, micro, *args, **kwargs)

    loop._accumulate_gradients = accumulate


if __name__ == "__main__":
    if os.environ.get("LEANTUNE_STEP_TOKENS_FILE"):
        # Patch only the side that runs: importing the other's trainer would add to this process's peak RSS.
        ours = any(arg.startswith("leantune") for arg in sys.argv[1:4])
        _patch_leantune() if ours else _patch_trainer()
    run_command(sys.argv[1:])
