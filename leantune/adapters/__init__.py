"""Fine-tuning methods, one file each, and the registry they join (base.py: `Method`, `Adapter`).

Importing the package registers every built-in method and its config section (each file's class registers
itself by name); full and freeze train the model's own weights (whole_model.py).
"""

# Registration happens on import, in this order: the order of `method:`'s choices and of `train --help`.
from . import lora, dora, ia3, bottleneck, prompt, prefix, whole_model  # noqa: F401, I001
