"""Merging and composing LoRA adapters: merge math (`methods`), combining adapter folders (`combine`),
folding an adapter into its base as a plain HF model (`fold`), YAML recipes (`recipe`) and several
adapters live on one base (`multi`)."""
