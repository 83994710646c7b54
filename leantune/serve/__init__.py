"""Serving: several adapters live on one base (`multi_lora`), the seed of `leantune serve`."""
