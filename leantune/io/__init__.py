"""Files, the foundation every layer writes and reads through: atomic writes (`atomic.py`) and a
tensor-by-tensor safetensors reader (`tensor_file.py`)."""
