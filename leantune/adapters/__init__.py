"""Adapters injected by module path into any torch model. They never import model code."""
