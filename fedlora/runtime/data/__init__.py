"""Datasets and federated partitions (runtime layer: datasets, flwr-datasets partitioners)."""
