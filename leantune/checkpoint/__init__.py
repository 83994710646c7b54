"""Everything that touches disk: atomic writes, PEFT-format adapters, resumable training state."""
