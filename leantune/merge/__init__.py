"""Merging adapters: merge math (`methods`), combining adapter folders (`combine`), folding an adapter into
its base as a plain HF model (`run`: through `infer/materialize.py`, or streamed by `fold` for LoRA),
YAML recipes (`recipe`) and what a QLoRA merge cost (`report`)."""
