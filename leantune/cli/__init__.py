"""Command-line entry points: parse, validate, call the library."""
