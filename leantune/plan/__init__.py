"""Plan before you train: a memory and time planner calibrated against measured runs.

    shape.py     a model's shape from config.json alone (meta device), what each method trains
    estimate.py  the predicted peak of one configuration, piece by piece, and its FLOPs (pure functions)
    devices.py   GPUs by name or memory size, this CPU's matmul rate
    report.py    every method on one device, the cheapest configuration that fits, the printed table

docs/plan.md publishes the error of these predictions against measured peaks (benchmarks/plan_calibration.py).
"""

from .devices import GPUS, Device, parse_gpu
from .estimate import Estimate, Setup, estimate
from .report import Plan, make_plan, render
from .shape import ModelShape, Trainable, read_config, shape_of, trainable_of

__all__ = ["GPUS", "Device", "Estimate", "ModelShape", "Plan", "Setup", "Trainable", "estimate", "make_plan",
           "parse_gpu", "read_config", "render", "shape_of", "trainable_of"]
