"""Inference with a base model plus an adapter (generation); the chat REPL around it is `cli/chat.py`."""
