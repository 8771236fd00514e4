"""Flower glue: the only package that imports flwr (with fedlora.cli.main and fedlora.results.outputs.report)."""
