"""Adapters injected by module path into any torch model. They never import model code.

Importing the package registers every method (each file's Adapter subclass registers itself by name).
"""

from . import base, bottleneck, dora, ia3, lora, prefix, prompt  # noqa: F401  (registration happens on import)
