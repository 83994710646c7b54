"""Export: a model or a run (its adapter merged through `infer/materialize.py`, or the adapter alone) in a
serving format. One package per format (`gguf/`), each an `Exporter` (base.py); `run.py` drives them."""
