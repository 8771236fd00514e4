"""Flower glue: the only package that imports flwr (with fedlora.main and fedlora.report)."""
