"""The data pipeline: read records, render with the chat template, mask labels, pack, batch."""
