"""What data a run reads and how it is split and partitioned (hashable settings, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

from fedlora.runtime.data.datasets import BUILTIN_BBC


@dataclass(frozen=True)
class DataSettings:
    """Data, split and partition settings (hashable)."""

    name: str = BUILTIN_BBC
    text_column: str = "text"
    label_column: str = "label"
    split: str = "train"
    max_examples: int | None = None
    test_fraction: float = 0.2
    validation_fraction: float = 0.0  # of the training split, held by the server for choosing settings (0: none)
    max_validation_examples: int | None = None  # at most this many held out for validation (the rest stay training)
    split_seed: int = 42
    client_test_fraction: float = 0.0  # of each client's partition, held out by the client to evaluate on (0: none)
    max_test_examples: int | None = None
    partition: str = "dirichlet"
    alpha: float = 0.5
    partition_seed: int = 42
    min_partition_size: int = 10
    size_sigma: float = 0.0  # inner_dirichlet: spread of the client sizes (0: equal)
    format: str = "auto"  # instruction layout: auto | alpaca | dolly (causal_lm only)
    category_column: str | None = "category"  # what a Dirichlet partition of instructions skews by
    drop_incomplete: bool = False  # drop rows with a missing text, label or response (counted) instead of failing


@dataclass(frozen=True)
class NodeData:
    """A deployed node's own training file: every row trains, labels numbered by the run's names."""

    path: str
    text_column: str
    label_column: str
    label_names: tuple[str, ...]
