"""leantune: lean, faithful fine-tuning of open LLMs.

The package imports nothing heavy at the top level: `leantune --help` must stay fast, so torch,
transformers and friends are imported inside the functions that need them.
"""

__version__ = "0.1.0"
