"""The training loop, optimizers, schedules, checkpoints and metrics."""
