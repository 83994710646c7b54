"""Pure tensor math, no state and no model code: everything else builds on it."""
