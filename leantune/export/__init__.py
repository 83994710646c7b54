"""Export: a model or a run (its LoRA merged, or the LoRA alone) as a GGUF file with a fidelity report."""
