"""What tests/e2e/test_distributed.py starts under torchrun: leantune's CLI, with a fault injected on one rank.

    LEANTUNE_TEST_FAULT=raise:RANK:STEP   that rank raises at the start of optimizer step STEP (1-based)
    LEANTUNE_TEST_FAULT=kill:RANK:STEP    that rank kills itself with SIGKILL there (kill -9)
    LEANTUNE_TEST_PROBE=OUT.json          no training: set the run up, then score the eval set three times
                                          in eval mode (no grad) and write the losses to OUT.json (rank 0)
"""

import json
import os
import signal
import sys
import time

from leantune.cli.main import main


def inject(kind: str, rank: int, at: int) -> None:
    from leantune.train import loop

    if int(os.environ.get("RANK", "0")) != rank:
        return
    original = loop.train_step

    def train_step(s, micro):
        if s.progress.step + 1 == at:
            if kind == "raise":
                raise RuntimeError(f"injected failure on rank {rank} at step {at} (t={time.time():.3f})")
            os.kill(os.getpid(), signal.SIGKILL)
        return original(s, micro)

    loop.train_step = train_step


def probe(out: str, argv: list[str]) -> int:
    """The eval-mode repack pitfall of a 4-bit base on CPU: repeated no-grad forwards must agree."""
    import leantune.adapters  # noqa: F401  (the methods' config sections)
    from leantune import config as config_mod
    from leantune.cli.main import _overrides, build_parser
    from leantune.train import distributed
    from leantune.train.setup import setup

    ns = build_parser().parse_args(argv)
    cfg = config_mod.load(ns.config, _overrides(ns))
    with distributed.started(cfg):
        s = setup(cfg)
        s.model.eval()
        losses = [distributed.evaluate(s.model, s.eval_plan, chunk=64)["eval_loss"] for _ in range(3)]
        if distributed.is_main():
            with open(out, "w") as f:
                json.dump({"losses": losses, "world_size": distributed.world_size()}, f)
    return 0


if __name__ == "__main__":
    if os.environ.get("LEANTUNE_TEST_PROBE"):
        sys.exit(probe(os.environ["LEANTUNE_TEST_PROBE"], sys.argv[1:]))
    fault = os.environ.get("LEANTUNE_TEST_FAULT")
    if fault:
        kind, r, at = fault.split(":")
        inject(kind, int(r), int(at))
    sys.exit(main(sys.argv[1:]))
