"""Loading Hugging Face models and tokenizers (local folder, hub id, .gguf) and picking dtypes."""
