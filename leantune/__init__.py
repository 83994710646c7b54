"""leantune: lean, faithful fine-tuning of open LLMs.

The package root imports nothing: `leantune --help` must stay fast, so the CLI (`cli/main.py`) imports
each subcommand's library code only when that subcommand runs. Below the CLI every import sits at the
top of its file and points down the layer table in `tests/unit/test_layers.py`.
"""

__version__ = "0.1.0"
