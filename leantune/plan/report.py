"""`leantune plan`: every method's predicted peak on one device, the cheapest configuration that fits, and why.

The plan is data (`Plan`, JSON-ready); `render` prints it. "Cheapest" means the fastest step per optimizer
step among the configurations that fit, at the effective batch asked for (a smaller micro-batch makes it up
with gradient accumulation): the compromises cost time (checkpointing runs the forward twice, a 4-bit base
dequantizes every weight per matmul, a small micro-batch uses the device worse), so the fastest fit is the
one with the fewest of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from .. import config as config_mod
from ..errors import ConfigError, LeantuneError
from ..models.demo_model import demo_model_dir
from .devices import CUDA_OVERHEAD, Device, cpu_device, parse_gpu
from .estimate import GiB, MiB, Estimate, Setup, estimate
from .shape import ModelShape, Trainable, read_config, shape_of, trainable_of

MFU = 0.3  # share of the matmul rate a step reaches: the H100 LoRA rows of docs/benchmarks.md reached 0.26-0.29
CPU_4BIT_PRICE = 2.0  # CPU: bitsandbytes dequantizes to fp32 per matmul; measured 2-2.7x LoRA's step (docs/memory.md)
GPU_4BIT_PRICE = 0.373 / 0.239  # H100, 1.1B shape, 8 x 1024, both with checkpointing: docs/benchmarks.md

# (method, quant, optimizer): the rows of the table, each planned with checkpointing off and on.
ROWS = [("full", None, "adamw"), ("full", None, "galore_adamw"), ("lora", None, "adamw"), ("lora", 4, "adamw"),
        ("lora", None, "adamw_8bit"), ("lora", 4, "paged_adamw_8bit"), ("dora", None, "adamw"), ("dora", 4, "adamw"),
        ("ia3", None, "adamw"), ("bottleneck", None, "adamw"), ("prefix", None, "adamw"), ("prompt", None, "adamw")]


@dataclass
class Plan:
    shape: ModelShape
    device: Device
    base: Setup
    rows: list[tuple[Estimate, Estimate]]         # (checkpointing off, on) per row of ROWS
    chosen: Estimate | None
    reason: str
    skipped: dict[str, str] = field(default_factory=dict)  # method -> why it cannot attach to this model
    step_s: dict[int, float] = field(default_factory=dict)  # id(estimate) -> seconds per optimizer step

    def as_dict(self) -> dict:
        sh = self.shape
        return {
            "model": {"name": sh.name, "model_type": sh.model_type, "params": sh.total_params, "layers": sh.layers,
                      "hidden": sh.hidden, "vocab": sh.vocab, "experts": sh.experts},
            "device": {"name": self.device.name, "memory_bytes": self.device.memory, "usable_bytes": self.device.usable,
                       "tflops": self.device.tflops, "source": self.device.source, "kind": self.device.kind},
            "seq": self.base.seq, "batch": self.base.batch, "dtype_bytes": self.base.dtype_bytes,
            "rows": [dict(e.as_dict(), fits=self.fits(e), step_s=self.step_s.get(id(e)))
                     for pair in self.rows for e in pair],
            "recommendation": None if self.chosen is None else dict(
                self.chosen.as_dict(), fits=True, step_s=self.step_s.get(id(self.chosen)), reason=self.reason),
            "reason": self.reason, "skipped": self.skipped,
        }

    def fits(self, e: Estimate) -> bool:
        return e.peak <= self.device.usable


def step_seconds(e: Estimate, shape: ModelShape, device: Device) -> float | None:
    """FLOPs at MFU x the device's matmul rate, times 4-bit's measured price (bitsandbytes dequantizes every
    weight for every matmul): 1.56x LoRA's step on an H100, 2x on a CPU. On a GPU that is well above the
    bandwidth floor of the dequantization traffic (`dequant_floor`), so the kernels, not the bytes, set it."""
    if not device.tflops:
        return None
    t = e.flops / (device.tflops * 1e12 * MFU)
    if e.setup.quant:
        t *= CPU_4BIT_PRICE if device.kind == "cpu" else GPU_4BIT_PRICE
    return t


def dequant_floor(e: Estimate, shape: ModelShape, device: Device) -> float | None:
    """Seconds per step that reading 0.5 B and writing and reading back a B per 4-bit weight costs, per matmul
    pass (forward, backward, and the recomputation), at the memory bandwidth: the least 4-bit can cost."""
    if not (e.setup.quant and device.bandwidth):
        return None
    passes = (3 if e.setup.checkpointing else 2) * e.setup.grad_accum
    return passes * shape.linear_params * (0.5 + 2 * e.setup.dtype_bytes) / (device.bandwidth * 1e9)


def _trainables(config, run_cfg, methods, needed: str) -> tuple[dict[str, Trainable], dict[str, str]]:
    """What each method trains here; a method that cannot attach to this architecture (IA3 without default
    targets for it, prefix tuning without a cache) is left out with its one-line reason, unless it is the
    method asked for, whose error is the answer."""
    out, failed = {}, {}
    for m in methods:
        try:
            out[m] = trainable_of(config, m, run_cfg)
        except LeantuneError as e:
            if m == needed:
                raise
            failed[m] = str(e).split(";")[0]
    return out, failed


def _setup_from(run_cfg, device: Device, seq: int | None, batch: int | None, method: str | None) -> Setup:
    dtype_bytes = 2 if device.bf16 else 4
    if run_cfg is not None and run_cfg.dtype == "fp32":
        dtype_bytes = 4
    elif run_cfg is not None and run_cfg.dtype == "bf16":
        dtype_bytes = 2
    t = run_cfg.train if run_cfg is not None else None
    q = run_cfg.quant if run_cfg is not None else None
    s = Setup(
        method=method or (run_cfg.method if run_cfg is not None else "lora"),
        quant=q.bits if q is not None else None, double_quant=q.double_quant if q is not None else True,
        blocksize=q.blocksize if q is not None else 64,
        optimizer=t.optimizer if t is not None else "adamw",
        checkpointing=t.gradient_checkpointing if t is not None else False,
        offload=t.checkpoint_offload if t is not None else False,
        batch=batch if batch is not None else (t.batch_size if t is not None else 4),
        seq=seq if seq is not None else (run_cfg.data.max_length if run_cfg is not None else 1024),
        grad_accum=t.grad_accum if t is not None else 1, dtype_bytes=dtype_bytes,
        loss_chunk=t.loss_chunk if t is not None else 256,
        rank=run_cfg.lora.rank if run_cfg is not None else 16,
        galore_rank=run_cfg.galore.rank if run_cfg is not None else 128,
        momentum=t.momentum if t is not None else 0.0, device=device.kind)
    if s.seq <= 0:
        raise ConfigError(f"--seq must be a positive number of tokens, got {s.seq}; e.g. --seq 2048")
    if s.batch <= 0:
        raise ConfigError(f"--batch must be a positive number of rows, got {s.batch}; e.g. --batch 4")
    return s


def load_source(source: str):
    """(transformers config, RunConfig or None, display name) for a model folder, config.json, hub id,
    .gguf file or a leantune YAML config (its model, method, data.max_length, train.* are used)."""
    run_cfg = None
    model = source
    if source.endswith((".yaml", ".yml")):
        run_cfg = config_mod.load(source, validate=False)
        if not run_cfg.model:
            raise ConfigError(f"{source} names no model: add `model: <folder or hub id>` to plan it")
        model = run_cfg.model
    elif source == "demo":
        model = str(demo_model_dir())
    config = read_config(model)
    if source == "demo":
        return config, run_cfg, "SmolLM2-135M-Instruct (the demo model)"
    name = str(model).rstrip("/").rsplit("/", 1)[-1] if "/" in str(model) else str(model)
    if name == "config.json":
        name = str(model).rstrip("/").rsplit("/", 2)[-2]
    return config, run_cfg, name.removesuffix(".json")


def make_plan(source: str, *, gpu: str | None = None, seq: int | None = None, batch: int | None = None,
              method: str | None = None, tflops: float | None = None) -> Plan:
    """Plan every method for `source` on `gpu` (a name or a size; None: this machine's CUDA device, else its CPU)."""
    for name, v in (("seq", seq), ("batch", batch)):
        if v is not None and v <= 0:
            raise ConfigError(f"--{name} must be > 0, got {v}; e.g. --seq 2048 --batch 4")
    if tflops is not None and tflops <= 0:
        raise ConfigError(f"--tflops must be > 0, got {tflops}")
    device = _device(gpu, tflops)
    config, run_cfg, name = load_source(source)
    shape = shape_of(config, name)
    base = _setup_from(run_cfg, device, seq, batch, method)
    methods = sorted({m for m, _, _ in ROWS} | {base.method}, key=lambda m: [r[0] for r in ROWS].index(m)
                     if m in [r[0] for r in ROWS] else 99)
    trained, failed = _trainables(config, run_cfg, methods, base.method)
    rows = []
    for m, q, opt in ROWS:
        if m in failed:
            continue
        s = replace(base, method=m, quant=q, optimizer=opt)
        rows.append(tuple(estimate(shape, replace(s, checkpointing=c), trained[m]) for c in (False, True)))
    plan = Plan(shape, device, base, rows, None, "", skipped=failed)
    for pair in rows:
        for e in pair:
            plan.step_s[id(e)] = step_seconds(e, shape, device)
    plan.chosen, plan.reason = recommend(plan, trained)
    if plan.chosen is not None:
        plan.step_s[id(plan.chosen)] = step_seconds(plan.chosen, shape, device)
    return plan


def _device(gpu: str | None, tflops: float | None) -> Device:
    if gpu:
        d = parse_gpu(gpu)
        return replace(d, tflops=tflops) if tflops else d
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            return Device(props.name, props.total_memory, tflops, None, "this machine's GPU", "cuda",
                          torch.cuda.is_bf16_supported())
    except Exception:  # noqa: BLE001 - no usable CUDA: plan for this CPU
        pass
    return cpu_device(tflops)


def recommend(plan: Plan, trained: dict[str, Trainable]) -> tuple[Estimate | None, str]:
    """The fastest configuration of the asked method (and its 4-bit variant for LoRA/DoRA) that fits."""
    base, shape, device = plan.base, plan.shape, plan.device
    quants = [None, 4] if base.method in ("lora", "dora") else [None]
    if base.quant and base.quant not in quants:
        quants.append(base.quant)
    optimizers = ["adamw", "adamw_8bit"] + (["galore_adamw"] if base.method == "full" else [])
    micro = sorted({max(1, base.batch // 2**k) for k in range(8)}, reverse=True)
    effective = base.batch * base.grad_accum
    fits, smallest = [], None
    for q in quants:
        for opt in optimizers:
            for ckpt in (False, True):
                for mb in micro:
                    s = replace(base, quant=q, optimizer=opt, checkpointing=ckpt, batch=mb,
                                grad_accum=math.ceil(effective / mb))
                    e = estimate(shape, s, trained[base.method])
                    if smallest is None or e.peak < smallest.peak:
                        smallest = e
                    if plan.fits(e):  # without a throughput, FLOPs order the same way
                        fits.append((step_seconds(e, shape, device) or e.flops, e.peak, e))
    if not fits:
        need = smallest.peak + (CUDA_OVERHEAD if device.kind == "cuda" else 0) if smallest else 0
        return None, (f"nothing fits: the smallest {base.method} configuration ({_describe(smallest.setup)}) needs "
                      f"{_gib(need)} with {'the CUDA context' if device.kind == 'cuda' else 'the runtime'}, "
                      f"{device.name} has {_gib(device.memory)}; try a shorter --seq, a smaller model or a bigger device")
    # A 16-bit base before a 4-bit one, then the fastest: 4-bit costs quality (docs/qlora.md measured +9% held-out
    # loss on a 135M model) as well as time.
    # Equal times (FLOPs do not see a device's worse use of small micro-batches): the larger micro-batch.
    fits.sort(key=lambda t: (t[2].setup.quant is not None and not base.quant, round(t[0], 6), -t[2].setup.batch,
                             t[2].setup.optimizer != base.optimizer, t[1]))
    _, _, e = fits[0]
    asked = estimate(shape, base, trained[base.method])
    why = f"{_describe(e.setup)}: peak {_gib(e.peak)} of {_gib(device.usable)} usable"
    if not plan.fits(asked):
        why += f"; as configured ({_describe(base)}) it needs {_gib(asked.peak)}"
    if e.setup.quant and not base.quant:
        why += "; no 16-bit base fits"
    else:
        why += "; the fastest that fits"
    return e, why


def _describe(s: Setup) -> str:
    parts = [s.label()]
    if s.optimizer in ("adamw", "galore_adamw"):
        parts.append("AdamW")
    parts.append("checkpointing" if s.checkpointing else "no checkpointing")
    parts.append(f"micro-batch {s.batch}" + (f" x {s.grad_accum} accumulation" if s.grad_accum > 1 else ""))
    return ", ".join(parts)


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB"


def _count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _secs(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t * 1e3:.0f} ms" if t < 1 else f"{t:.1f} s"


def _flop(n: float) -> str:
    """FLOPs in the unit that shows them: a small model's step is GFLOPs, which 0.0 TFLOP hid."""
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e6:.1f} MFLOP"


def render(plan: Plan, fit: bool = False, source: str = "CONFIG") -> str:
    sh, d, b = plan.shape, plan.device, plan.base
    rate = f"{d.tflops:.0f} TFLOP/s ({d.source})" if d.tflops and d.tflops >= 1 else \
        (f"{d.tflops * 1e3:.0f} GFLOP/s ({d.source})" if d.tflops else "throughput unknown: pass --gpu NAME or --tflops")
    lines = [f"leantune plan: {sh.name} ({sh.model_type}, {_count(sh.total_params)} parameters, {sh.layers} layers, "
             f"hidden {sh.hidden}, vocab {sh.vocab}{', tied head' if sh.tied else ''}"
             f"{f', {sh.experts} experts' if sh.experts > 1 else ''})",
             f"device: {d.name}, {_gib(d.memory)} ({_gib(d.usable)} usable{' after the CUDA context' if d.kind == 'cuda' else ''}); "
             f"{rate}",
             f"per micro-batch: {b.batch} x {b.seq} tokens, {'bf16' if b.dtype_bytes == 2 else 'fp32'} compute, "
             f"loss chunk {b.loss_chunk}; step time at {MFU:.0%} of that rate, per optimizer step", ""]
    head = f"{'configuration':<34} {'trainable':>10} {'peak, ckpt off':>16} {'peak, ckpt on':>16} {'step (on)':>10}"
    lines += [head, "-" * len(head)]
    for off, on in plan.rows:
        mark = lambda e: f"{_gib(e.peak):>11} {'ok' if plan.fits(e) else 'OOM':>4}"  # noqa: E731
        lines.append(f"{off.setup.label():<34} {_count(off.trainable_params):>10} {mark(off):>16} {mark(on):>16} "
                     f"{_secs(plan.step_s.get(id(on))):>10}")
    for m, why in plan.skipped.items():
        lines.append(f"{m:<34} not planned: {why}")
    lines.append("")
    e = plan.chosen
    if e is None:
        lines.append(f"recommendation: {plan.reason}")
        return "\n".join(lines)
    lines.append(f"recommended: {plan.reason}")
    lines.append(f"  breakdown: weights {_gib(e.weights)}, trainable {_gib(e.trainable)} + gradients "
                 f"{_gib(e.gradients)}, optimizer {_gib(e.optimizer)}, saved activations {_gib(e.activations)}, "
                 f"loss chunk {_gib(e.logits)}, temporaries {_gib(e.temporaries)}"
                 + (f", runtime {_gib(e.runtime)}" if e.runtime else "") + f" -> peak {_gib(e.peak)}")
    o = e.outside
    lines.append(f"  outside the step: first eval {_gib(o['eval_device'])} on the device; checkpoint save "
                 f"{_gib(o['save_host'])} host RAM; merge {_gib(o['merge_host'])} host; GGUF export "
                 f"{_gib(o['export_host'])} host"
                 + (f"; offloaded checkpoints {_gib(o['offload_host'])} pinned host RAM during the step"
                    if o.get("offload_host") else ""))
    t = plan.step_s.get(id(e))
    lines.append(f"  step: {_flop(e.flops)} per optimizer step" +
                 (f", {_secs(t)}" if t else " (for a time, name the GPU or pass --tflops)"))
    q4 = next((pair for pair in plan.rows if pair[0].setup.quant == 4 and pair[0].setup.optimizer == "adamw"), None)
    l16 = next((pair for pair in plan.rows if pair[0].setup.method == "lora" and pair[0].setup.quant is None), None)
    if q4 and l16:
        t4, t16 = plan.step_s.get(id(q4[1])), plan.step_s.get(id(l16[1]))
        if t4 and t16:
            floor = dequant_floor(q4[1], sh, d)
            lines.append(f"  4-bit's price: QLoRA saves {_gib(l16[1].weights - q4[1].weights)} of weights and costs "
                         f"{t4 / t16:.2f}x LoRA's step time (measured on {'this kind of CPU' if d.kind == 'cpu' else 'an H100'}; "
                         "bitsandbytes dequantizes every weight per matmul)"
                         + (f"; the memory traffic alone would be {_secs(floor)}" if floor else ""))
    for note in e.notes:
        lines.append(f"  note: {note}")
    if fit:
        s = e.setup
        flags = [f"--method {s.method}", f"--train.batch_size {s.batch}", f"--train.grad_accum {s.grad_accum}",
                 f"--train.gradient_checkpointing {str(s.checkpointing).lower()}", f"--train.optimizer {s.optimizer}"]
        flags.append(f"--quant.bits {s.quant}" if s.quant else "--quant.bits null")
        config = source if source.endswith((".yaml", ".yml")) else "CONFIG"
        lines.append(f"fit: leantune train {config} " + " ".join(flags))
    return "\n".join(lines)
