"""The one local training loop and evaluation (runtime layer)."""
