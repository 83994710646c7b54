"""`train.auto_fit` (`leantune train --fit`): size a run to the device's memory before anything loads.

Keeps what the config asks to learn (method, quantization, optimizer, the global batch of
batch_size x grad_accum rows) and chooses how to get there: the micro-batch (a divisor of the global
batch, so accumulation keeps it exact) and gradient checkpointing. Among the choices the planner
predicts to fit, the fastest step wins (checkpointing costs one more forward), then the larger
micro-batch (a device uses small ones worse, which FLOPs do not see). The choice and its predicted peak
go into the run's summary.json beside the measured peak (`fit`), so every fitted run is a calibration point.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..config import RunConfig
from ..device import pick_dtype, resolve_device
from ..errors import ConfigError
from .devices import Device, host_memory, meminfo, parse_gpu
from .estimate import Estimate, estimate
from .report import _describe, _gib, _setup_from, step_seconds
from .shape import ModelShape, Trainable, read_config, shape_of, trainable_of


@dataclass
class Fit:
    chosen: Estimate
    configured: Estimate
    device: Device

    def record(self) -> dict:
        """What summary.json keeps (the loop adds the measured peak)."""
        s, c = self.chosen.setup, self.configured.setup
        return {"choice": _describe(s), "budget_bytes": self.device.usable, "device": self.device.name,
                "batch_size": s.batch, "grad_accum": s.grad_accum, "gradient_checkpointing": s.checkpointing,
                "predicted_peak_bytes": self.chosen.peak,
                "configured": {"batch_size": c.batch, "grad_accum": c.grad_accum,
                               "gradient_checkpointing": c.checkpointing, "predicted_peak_bytes": self.configured.peak}}

    def message(self) -> str:
        e, c = self.chosen, self.configured
        same = (e.setup.batch, e.setup.grad_accum, e.setup.checkpointing) == \
               (c.setup.batch, c.setup.grad_accum, c.setup.checkpointing)
        head = "auto_fit: keeping the configuration" if same else "auto_fit: sized to fit"
        return (f"{head}: {_describe(e.setup)}; predicted peak {_gib(e.peak)} of {_gib(self.device.usable)} "
                f"({self.device.name})" + ("" if same else f"; as configured it was {_gib(c.peak)}"))


def fit_device(cfg: RunConfig, device_type: str) -> Device:
    """The memory to fit into: train.fit_memory (a size or a GPU name) when set, else this device's."""
    kind = "cuda" if device_type == "cuda" else "cpu"
    if cfg.train.fit_memory:
        d = parse_gpu(cfg.train.fit_memory)
        return replace(d, kind=kind, name=f"train.fit_memory {cfg.train.fit_memory}", bf16=d.bf16 and kind == "cuda")
    if kind == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        return Device(props.name, props.total_memory, None, None, "this machine's GPU", "cuda",
                      torch.cuda.is_bf16_supported())
    return Device("this CPU's RAM", _available_ram(), None, None, "MemAvailable", "cpu", bf16=False)


def _available_ram() -> int:
    return meminfo("MemAvailable") or host_memory()


def choose(shape: ModelShape, trained: Trainable, base, device: Device, runtime: int | None = None) -> Fit:
    """The fastest (micro-batch, checkpointing) with the global batch of `base` that fits `device`."""
    total = base.batch * base.grad_accum
    configured = estimate(shape, base, trained, runtime)
    fits, smallest = [], configured
    for mb in [d for d in range(total, 0, -1) if total % d == 0]:
        for ckpt in (False, True):
            e = estimate(shape, replace(base, batch=mb, grad_accum=total // mb, checkpointing=ckpt), trained, runtime)
            smallest = e if e.peak < smallest.peak else smallest
            if e.peak <= device.usable:
                fits.append((round(step_seconds(e, shape, device) or e.flops, 9), -mb, e))
    if not fits:
        raise ConfigError(f"train.auto_fit: nothing fits {_gib(device.usable)} ({device.name}): the smallest choice "
                          f"({_describe(smallest.setup)}) needs {_gib(smallest.peak)}; try quant.bits 4, a shorter "
                          "data.max_length, or see `leantune plan CONFIG --fit` for other methods")
    fits.sort(key=lambda t: t[:2])
    return Fit(fits[0][2], configured, device)


def fit_run(cfg: RunConfig, device_type: str) -> Fit:
    """Plan `cfg` as it would run on `device_type` ("cuda" or "cpu") and choose its batch layout."""
    device = fit_device(cfg, device_type)
    config = read_config(cfg.model)
    shape = shape_of(config, str(cfg.model))
    # the dtype the run will pick (auto: bf16 where this device computes it fast), for activations and weights
    base = replace(_setup_from(cfg, device, None, None, None), dtype_bytes=pick_dtype(cfg.dtype, device_type).itemsize)
    return choose(shape, trainable_of(config, cfg.method, cfg), base, device)


def prepare(cfg: RunConfig, resume: bool = False, console=print) -> dict | None:
    """Apply train.auto_fit to `cfg` before a run: choose, print, set; the record for summary.json.
    A resumed run keeps the layout it started with (its config.yaml holds the fitted values)."""
    if not cfg.train.auto_fit:
        return None
    if resume:
        console("auto_fit: resuming keeps the run's micro-batch, accumulation and checkpointing")
        return None
    fit = fit_run(cfg, resolve_device(cfg.device).type)
    console(fit.message())
    apply(cfg, fit)
    return fit.record()


def apply(cfg: RunConfig, fit: Fit) -> RunConfig:
    """`cfg` with the chosen micro-batch, accumulation and checkpointing (the global batch unchanged)."""
    s = fit.chosen.setup
    cfg.train.batch_size, cfg.train.grad_accum, cfg.train.gradient_checkpointing = s.batch, s.grad_accum, s.checkpointing
    return cfg
