"""What the loop asks of the other processes when it runs in several (torchrun). Today: one process.

A step's loss is the sum of the per-token losses over all its label tokens divided by how many there
are, so k micro-batches give the gradient of one batch k times larger (train/loop.py). Across processes
the same holds only when every process divides by the label tokens of the whole step on every process,
not by its own: `global_token_count` is the one place that count is taken.

Under torchrun it becomes `dist.all_reduce(t, op=SUM)` of this process's count. DDP then averages the
gradients over the W processes, so the normaliser there is global / W (as torchtune's distributed
recipe scales its gradients by W / tokens); the epoch plan is sharded by rank (it is deterministic per
(seed, epoch), data/dataset.py) and only rank 0 writes the run folder.
"""

from __future__ import annotations


def global_token_count(n: int) -> int:
    """Label tokens of this step over every process: `n` itself while training runs in one process."""
    return n
