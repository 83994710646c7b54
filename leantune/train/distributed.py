"""Training in several processes (torchrun): DDP or FSDP2, one loop for 1 or N processes.

    torchrun --nproc-per-node 2 -m leantune train my.yaml        # WORLD_SIZE, RANK, MASTER_ADDR from torchrun

Every function here is the identity, or close to it, in one process, so the loop (train/loop.py) reads the
same either way. With W processes:

- Data. The epoch's plan is built for W x batch_size rows per micro-batch (the same plan one process with
  that batch size trains) and rank r takes rows [r*b, (r+1)*b) of each (`rank_plan`). A rank left without
  rows runs one row with no labels, so every rank joins every collective.
- Loss. A step's loss is the sum of per-token losses over every label token of the step on every process,
  divided by their count: `global_token_count` all-reduces that count. DDP and FSDP2 average gradients over
  W, so each rank's loss is scaled by W before backward (as torchtune's recipe scales by W / tokens), and
  the step loss printed is the average of those scaled losses over the ranks. Then W x micro-batch b trains
  exactly as one process with micro-batch W*b (tests/e2e/test_distributed.py checks it).
- Model. DDP replicates the model; FSDP2 (`fully_shard` on each decoder layer, then on the root) shards
  weights, gradients and optimizer state. Both wrap `_Loss`, a module whose forward is the loss of one
  micro-batch, because the loop runs the decoder and the head itself (train/step.py), not `model()`.
  A 4-bit base stays out of FSDP2's hands (`ignored_params`): its packed payload must not be cast, and on
  CPU bitsandbytes repacks it in place in eval mode, which a later all-gather silently undoes
  (docs/distributed.md, accelerate #3983).
- Files. Rank 0 alone writes: sharded tensors are gathered (`full_tensor`) on every rank into rank 0's copy
  (`gathered`), so checkpoints and the final adapter have the format of a one-process run, and a run can
  resume with another number of processes when W x batch_size stays the same.
- Failure. A rank that raises exits non-zero; torchrun then stops the others at once. A rank that hangs
  fails the others after distributed.timeout_s. Before "done" every rank agrees (`agree`).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..data.dataset import batch_plan, shift_count
from ..data.tokenize import IGNORE
from ..errors import ConfigError
from . import step

_RUNNER = "_leantune_runner"  # the attribute of the HF model that holds its DDP/FSDP2 wrapper


# ------------------------------------------------------------------------------------------------
# Who am I


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0: the one process that prints, logs and writes files."""
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or srun with torchrun's variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@contextlib.contextmanager
def started(cfg) -> Iterator[bool]:
    """Join the process group torchrun describes (gloo on CPU, nccl for CUDA tensors) for the body of a
    run; yield whether this is rank 0. Other ranks print nothing (their stdout goes to /dev/null, errors
    still reach stderr) and show no progress bar. In one process: nothing to do, yields True."""
    if not launched() or dist.is_initialized():
        yield is_main()
        return
    cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                            timeout=datetime.timedelta(seconds=cfg.distributed.timeout_s))
    stdout = sys.stdout
    if not is_main():
        cfg.train.progress = False
        sys.stdout = open(os.devnull, "w")
    try:
        yield is_main()
    finally:
        if sys.stdout is not stdout:
            sys.stdout.close()
            sys.stdout = stdout
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """This process's device: cuda:LOCAL_RANK under torchrun on GPUs."""
    if device.type == "cuda" and world_size() > 1 and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# ------------------------------------------------------------------------------------------------
# Numbers every rank agrees on


def _all_reduce(values: list[float], op=None) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t.tolist()


def global_token_count(n: int) -> int:
    """Label tokens of this step over every process (the normaliser of every rank's loss)."""
    if world_size() == 1:
        return n
    return int(_all_reduce([n])[0])


def average(x: float) -> float:
    """The mean of `x` over the processes: the step's loss from each rank's W-scaled share of it."""
    if world_size() == 1:
        return x
    return _all_reduce([x])[0] / world_size()


def agree(ok: bool = True) -> bool:
    """Every rank reaches this point and says whether it succeeded; True only if all did. A rank that
    died makes this raise (gloo: the connection closes) or time out, never hang forever."""
    if world_size() == 1:
        return ok
    return _all_reduce([0.0 if ok else 1.0])[0] == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


# ------------------------------------------------------------------------------------------------
# Data: every example once per epoch across ranks


class RankPlan(Sequence):
    """Rank r's micro-batches of an epoch: rows [r*b, (r+1)*b) of each micro-batch of the W*b-row plan.

    Every rank has as many micro-batches as the plan, so every rank steps together. A rank whose slice is
    empty (the last micro-batch of an epoch may be short) gets the first row with every label masked:
    a forward and backward that adds nothing, but joins the collectives."""

    def __init__(self, plan: Sequence[dict], rank: int, rows: int):
        self.plan, self.rank, self.rows = plan, rank, rows

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, k: int) -> dict:
        return rank_slice(self.plan[k], self.rank, self.rows)


def rank_slice(batch: dict, r: int, rows: int) -> dict:
    """Rows [r*rows, (r+1)*rows) of a collated batch (B, T); an empty slice becomes a no-label filler row."""
    B = batch["input_ids"].shape[0]
    lo, hi = r * rows, min((r + 1) * rows, B)
    if lo >= B:
        return filler(batch)
    out = {k: v[lo:hi] for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["num_label_tokens"] = shift_count(out["labels"])
    # Real tokens for tokens/s: this slice's share of the batch's (padding is not marked in packed rows).
    out["num_tokens"] = round(batch.get("num_tokens", B * batch["input_ids"].shape[1]) * (hi - lo) / B)
    return out


def filler(batch: dict) -> dict:
    """The batch's first row with every label masked: a forward (and backward) that adds nothing."""
    out = {k: v[:1].clone() for k, v in batch.items() if isinstance(v, torch.Tensor)}
    out["labels"].fill_(IGNORE)
    out["num_label_tokens"], out["num_tokens"] = 0, 0
    return out


def rank_plan(cfg, examples, pad_id: int, epoch: int) -> Sequence[dict]:
    """The micro-batches this process trains in `epoch`: the whole plan in one process, else its rows of
    the plan of W x train.batch_size rows (deterministic per seed and epoch, like the plan itself)."""
    W = world_size()
    if W == 1:
        return batch_plan(cfg, examples, pad_id, epoch=epoch)
    import copy

    wide = copy.copy(cfg)
    wide.train = copy.copy(cfg.train)
    wide.train.batch_size = cfg.train.batch_size * W
    return RankPlan(batch_plan(wide, examples, pad_id, epoch=epoch), rank(), cfg.train.batch_size)


def check_resume(saved_rows: int, cfg) -> None:
    """A checkpoint's data position counts micro-batches of W x batch_size rows: resuming with another
    number of processes is exact when that product stays the same."""
    rows = cfg.train.batch_size * world_size()
    if saved_rows and saved_rows != rows:
        raise ConfigError(
            f"the checkpoint was trained with {saved_rows} rows per micro-batch over all processes (processes x "
            f"train.batch_size), this run has {rows} ({world_size()} x {cfg.train.batch_size}); set "
            f"--train.batch_size {max(1, saved_rows // world_size())} so the product is {saved_rows} again")


# ------------------------------------------------------------------------------------------------
# The model: DDP or FSDP2 around the loss of a micro-batch


class _Loss(nn.Module):
    """The loss of one micro-batch as a forward, so DDP and fully_shard see the whole step (the loop runs
    `model.base_model` and the head itself). `scale` is W: both average gradients over the ranks."""

    def __init__(self, model: nn.Module, scale: float):
        super().__init__()
        self.model, self.scale = model, scale

    def forward(self, batch: dict, normalizer: float, chunk: int):
        loss, n = step.micro_batch_loss(self.model, batch, normalizer=normalizer, chunk=chunk)
        return loss * self.scale, n


def choose_strategy(cfg, model, device: torch.device) -> str:
    """auto: DDP when the weights, their gradients and AdamW's two fp32 moments fit 80% of one device
    (always on CPU), else FSDP2."""
    s = cfg.distributed.strategy
    if s != "auto" or device.type != "cuda":
        return "ddp" if s == "auto" else s
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    need = weights + trainable * (4 + 8)
    return "ddp" if need < 0.8 * torch.cuda.get_device_properties(device).total_memory else "fsdp2"


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The blocks FSDP2 shards one by one: the classes the model names as never to be split."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(f"{type(model).__name__} names no decoder layer class (_no_split_modules); "
                          "use --distributed.strategy ddp")
    return layers


def _quantized(p: nn.Parameter) -> bool:
    # bitsandbytes' Params4bit / Int8Params: packed integer payloads that must stay as they are.
    return type(p).__name__ in ("Params4bit", "Int8Params") or not p.is_floating_point()


def wrap(model: nn.Module, cfg, device: torch.device, console=print) -> str | None:
    """Put the model under DDP or FSDP2 when there are several processes; the HF model object stays the
    one the run saves (its parameter names do not change). Returns the strategy, None in one process."""
    W = world_size()
    if W == 1:
        return None
    strategy = choose_strategy(cfg, model, device)
    runner = _Loss(model, scale=float(W))
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        runner = DDP(runner, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        from torch.distributed.fsdp import fully_shard

        ignored = {p for p in model.parameters() if _quantized(p)} or None
        for layer in _decoder_layers(model):
            fully_shard(layer, reshard_after_forward=cfg.distributed.reshard_after_forward, ignored_params=ignored)
        fully_shard(runner, reshard_after_forward=cfg.distributed.reshard_after_forward, ignored_params=ignored)
    model.__dict__[_RUNNER] = runner  # not a submodule: the HF model's state dict stays its own
    console(f"{strategy} over {W} processes ({dist.get_backend()}), micro-batch {cfg.train.batch_size} per process "
            f"= {cfg.train.batch_size * W} rows")
    return strategy


def micro_batch_loss(model, batch: dict, *, normalizer: float, chunk: int) -> tuple[torch.Tensor, int]:
    """step.micro_batch_loss, through the DDP/FSDP2 wrapper when the model has one (then the loss is W
    times this rank's share of the step's loss: the ranks' gradients are averaged)."""
    runner = model.__dict__.get(_RUNNER)
    if runner is None:
        return step.micro_batch_loss(model, batch, normalizer=normalizer, chunk=chunk)
    return runner(batch, normalizer, chunk)


def skippable(batch: dict) -> bool:
    """A micro-batch without labels adds nothing; one process skips it, several run it (collectives)."""
    return batch["num_label_tokens"] == 0 and world_size() == 1


@torch.no_grad()
def evaluate(model, batches: Sequence[dict], *, chunk: int, limit: int | None = None) -> dict:
    """step.evaluate over every rank: rank r scores micro-batches r, r+W, ...; the token-weighted sums are
    all-reduced, so the result is the one-process eval loss."""
    runner = model.__dict__.get(_RUNNER)
    if runner is None:
        return step.evaluate(model, batches, chunk=chunk, limit=limit)
    import math

    W, n = world_size(), len(batches) if limit is None else min(limit, len(batches))
    was_training = model.training
    model.eval()
    total, tokens = 0.0, 0
    for k in range(rank(), -(-n // W) * W, W):  # every rank as many forwards (FSDP2 gathers in each)
        b = batches[k] if k < n else filler(batches[0])
        m = b["num_label_tokens"]
        loss, _ = runner(b, max(m, 1) * W, chunk)  # the runner scales by W
        total += float(loss) * m
        tokens += m
    model.train(was_training)
    total, tokens = _all_reduce([total, tokens]) if n else (0.0, 0)
    if tokens == 0:
        return {}
    mean = total / tokens
    return {"eval_loss": mean, "eval_ppl": math.exp(min(mean, 50.0)), "eval_tokens": int(tokens)}


def clip_grad_norm(params: list, max_norm: float | None) -> float:
    """The gradient norm over every process (before clipping), clipping to `max_norm` when set. Under
    DDP the gradients are already equal everywhere; under FSDP2 they are shards and the norm is a DTensor."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if max_norm:
        norm = torch.nn.utils.clip_grad_norm_(grads, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad.detach().float() for p in grads])
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


# ------------------------------------------------------------------------------------------------
# Files: rank 0 writes what every rank gathered


def _is_dtensor(t: Any) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


@contextlib.contextmanager
def gathered(model: nn.Module, optimizer=None, *, whole: bool = False) -> Iterator[dict | None]:
    """Collective (every rank enters): rank 0's model holds full tensors in place of its FSDP2 shards, the
    trainable ones (all of them with `whole`), for the body; yields the optimizer's state dict with full
    tensors on rank 0 (None elsewhere; the plain state dict in one process or under DDP)."""
    shards = [(m, name, p) for m in model.modules() for name, p in m._parameters.items()
              if p is not None and _is_dtensor(p) and (whole or p.requires_grad)]
    if not shards:
        yield optimizer.state_dict() if optimizer is not None and is_main() else None
        return
    swapped = []
    for m, name, p in shards:
        full = p.full_tensor().detach().cpu()  # every rank: all-gather
        if is_main():
            m._parameters[name] = nn.Parameter(full, requires_grad=p.requires_grad)
            swapped.append((m, name, p))
    state = _full_optimizer_state(optimizer) if optimizer is not None else None
    try:
        yield state
    finally:
        for m, name, p in swapped:
            m._parameters[name] = p


def _full_optimizer_state(optimizer) -> dict | None:
    sd = optimizer.state_dict()
    for pid in sorted(sd["state"]):
        st = sd["state"][pid] = dict(sd["state"][pid])  # state_dict() shares these dicts with the optimizer
        for key in sorted(st):
            if _is_dtensor(st[key]):
                st[key] = st[key].full_tensor().cpu()  # every rank, same order: all-gathers match
    return sd if is_main() else None


def copy_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """p.copy_(full) where p may be an FSDP2 shard: each rank keeps its own part of the full tensor."""
    if _is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
    p.copy_(full)


def shard_optimizer_state(optimizer, sd: dict) -> dict:
    """A one-process optimizer state dict (full tensors), cut to this rank's shards for FSDP2 params."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if not any(_is_dtensor(p) for p in params):
        return sd
    from torch.distributed.tensor import distribute_tensor

    for pid, st in sd["state"].items():
        p = params[int(pid)]
        if not _is_dtensor(p):
            continue
        for key, v in list(st.items()):
            if isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape):
                st[key] = distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
    return sd


class NullLog:
    """The metrics log of a rank other than 0: it writes nothing."""

    tb_note = None

    def log(self, step: int, **values: float) -> None: ...

    def close(self) -> None: ...
