"""Adapter files (PEFT's formats and leantune's own) and the run folder's layout (`run_folder.py`).
Resumable training state is `train/state.py`; atomic writes are `io/`."""
