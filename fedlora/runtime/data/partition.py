"""Split the training pool across clients with flwr-datasets partitioners (no hub access)."""

from __future__ import annotations

import warnings
from collections import Counter

from fedlora.runtime.data.datasets import DataError


def partition_indices(
    labels: list[int], num_clients: int, *, kind: str = "dirichlet", alpha: float = 0.5,
    seed: int = 42, min_partition_size: int = 10,
) -> list[list[int]]:
    """Return, for each client, the positions in ``labels`` it holds.

    ``kind="dirichlet"`` is label skew (per class, client shares ~ Dir(alpha)); ``"iid"`` is a
    uniform split. Both use flwr-datasets partitioners on an in-memory dataset.
    """
    from datasets import Dataset  # noqa: PLC0415
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner  # noqa: PLC0415

    if kind == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients, partition_by="label", alpha=alpha, seed=seed,
            min_partition_size=min_partition_size, self_balancing=False, shuffle=True,
        )
    elif kind == "iid":
        partitioner = IidPartitioner(num_partitions=num_clients)
    else:
        raise ValueError(f"partition.kind={kind!r} is not one of ('dirichlet', 'iid')")
    partitioner.dataset = Dataset.from_dict({"label": list(labels), "pos": list(range(len(labels)))})
    try:
        with warnings.catch_warnings():
            # each failed draw warns; the outcome is what counts (an error below, or the partitions)
            warnings.simplefilter("ignore", UserWarning)
            return [sorted(partitioner.load_partition(pid)["pos"]) for pid in range(num_clients)]
    except ValueError as exc:
        if kind != "dirichlet":
            raise
        raise DataError(f"partition.min_partition_size={min_partition_size}: no Dirichlet draw (alpha={alpha:g}, 10 "
                        f"attempts) gave each of the {num_clients} clients at least {min_partition_size} of the "
                        f"{len(labels)} training examples ({exc}); lower partition.min_partition_size, raise "
                        "partition.alpha, use fewer clients, or partition=iid") from None


def label_histogram(labels: list[int], indices: list[int]) -> dict[int, int]:
    """Return ``{label: count}`` of one partition (for run logs)."""
    return dict(sorted(Counter(labels[i] for i in indices).items()))
