"""Scoring a model against another on the same tokens (`compare`), and the held-out data to score on (`held_out`)."""
