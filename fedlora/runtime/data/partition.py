"""Split the training pool across clients with flwr-datasets partitioners (no hub access).

Building every partition costs time in the configuration check, the server and every client
actor, so it must not grow faster than the data: at 10,000 clients, asking a partitioner for each
partition in turn (one ``Dataset.select`` or ``shard`` per client) took 10.6 s per process. Here:

* ``iid`` is the contiguous, balanced split that flwr-datasets' ``IidPartitioner`` makes (its
  ``Dataset.shard(n, i, contiguous=True)``: the first ``len % n`` shards one example longer),
  computed directly from the sizes; ``tests/test_data.py`` checks it equals the partitioner's;
* ``dirichlet`` draws with flwr-datasets' ``DirichletPartitioner`` as before and reads all the
  partitions from its one draw (:func:`_dirichlet_parts`), not one ``select`` per client;
* ``inner_dirichlet`` fixes each client's size first (:func:`partition_sizes`: at least
  ``min_partition_size`` each *by construction*, the rest spread by seeded log-normal weights, so
  sizes differ as much as ``size_sigma`` asks) and then draws each client's label mix from
  ``Dir(alpha)`` with flwr-datasets' ``InnerDirichletPartitioner``: strong label skew with many
  clients never fails the way re-drawing ``dirichlet`` until every client is large enough can.

Both return exactly what the partitioner's ``load_partition`` returns for every client (sorted
positions), so runs partition as they always did.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

from fedlora.runtime.data.datasets import DataError


def iid_bounds(num_examples: int, num_clients: int, client: int) -> tuple[int, int]:
    """``[start, end)`` of client ``client``'s block in the contiguous, balanced IID split.

    Each client gets ``num_examples // num_clients`` examples and the first
    ``num_examples % num_clients`` clients one more, in order: flwr-datasets' ``IidPartitioner``.
    """
    size, extra = divmod(num_examples, num_clients)
    start = client * size + min(client, extra)
    return start, start + size + (client < extra)


def iid_partitions(num_examples: int, num_clients: int) -> list[list[int]]:
    """Every client's positions in the IID split of ``num_examples`` (see :func:`iid_bounds`)."""
    return [list(range(*iid_bounds(num_examples, num_clients, c))) for c in range(num_clients)]


KINDS = ("dirichlet", "inner_dirichlet", "iid")


def partition_sizes(total: int, num_clients: int, min_size: int, sigma: float, seed: int) -> list[int]:
    """Client sizes summing to ``total``, each at least ``min_size``: ``min_size`` plus a share of the
    rest proportional to seeded ``LogNormal(0, sigma)`` weights (``sigma = 0``: as equal as integers
    allow), rounded down, the remainder one example each to the largest fractional parts.

    Raises
    ------
    DataError
        When ``num_clients * min_size > total``.
    """
    import numpy as np  # noqa: PLC0415

    spare = total - num_clients * min_size
    if spare < 0:
        raise DataError(f"partition.min_partition_size={min_size}: {num_clients} clients x {min_size} = "
                        f"{num_clients * min_size} examples, but the training split holds {total}; lower "
                        "partition.min_partition_size or use fewer clients")
    rng = np.random.default_rng(seed)
    weights = rng.lognormal(0.0, sigma, num_clients) if sigma > 0 else np.ones(num_clients)
    exact = spare * weights / weights.sum()
    extra = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - extra), kind="stable")[: spare - int(extra.sum())]:
        extra[i] += 1
    return [int(min_size + e) for e in extra]


def partition_indices(
    labels: list[int], num_clients: int, *, kind: str = "dirichlet", alpha: float = 0.5,
    seed: int = 42, min_partition_size: int = 10, size_sigma: float = 0.0,
) -> list[list[int]]:
    """Return, for each client, the positions in ``labels`` it holds (sorted).

    ``kind="dirichlet"`` is label skew (per class, client shares ~ Dir(alpha)); ``"inner_dirichlet"``
    label skew at sizes fixed first (per client, label mix ~ Dir(alpha); sizes from
    :func:`partition_sizes` with ``size_sigma``); ``"iid"`` is a uniform split. All are flwr-datasets'
    partitioners' splits.
    """
    if kind == "iid":
        return iid_partitions(len(labels), num_clients)
    if kind not in KINDS:
        raise ValueError(f"partition.kind={kind!r} is not one of {KINDS}")
    from datasets import Dataset  # noqa: PLC0415
    from flwr_datasets.partitioner import DirichletPartitioner, InnerDirichletPartitioner  # noqa: PLC0415

    if kind == "inner_dirichlet":
        sizes = partition_sizes(len(labels), num_clients, min_partition_size, size_sigma, seed)
        inner = InnerDirichletPartitioner(partition_sizes=sizes, partition_by="label", alpha=alpha, seed=seed,
                                          shuffle=True)
        inner.dataset = Dataset.from_dict({"label": list(labels), "pos": list(range(len(labels)))})
        return _dirichlet_parts(inner, num_clients)

    partitioner = DirichletPartitioner(
        num_partitions=num_clients, partition_by="label", alpha=alpha, seed=seed,
        min_partition_size=min_partition_size, self_balancing=False, shuffle=True,
    )
    partitioner.dataset = Dataset.from_dict({"label": list(labels), "pos": list(range(len(labels)))})
    try:
        with warnings.catch_warnings():
            # each failed draw warns; the outcome is what counts (an error below, or the partitions)
            warnings.simplefilter("ignore", UserWarning)
            return _dirichlet_parts(partitioner, num_clients)
    except ValueError as exc:
        raise DataError(f"partition.min_partition_size={min_partition_size}: no Dirichlet draw (alpha={alpha:g}, 10 "
                        f"attempts) gave each of the {num_clients} clients at least {min_partition_size} of the "
                        f"{len(labels)} training examples ({exc}); lower partition.min_partition_size, raise "
                        "partition.alpha, use fewer clients, or partition=iid") from None


def _dirichlet_parts(partitioner: Any, num_clients: int) -> list[list[int]]:
    """All partitions of one Dirichlet draw, each as ``load_partition(pid)`` gives it (sorted positions).

    The first ``load_partition`` draws the assignment of every example; flwr-datasets 0.6 keeps it
    as ``{partition id: row indices}`` (rows are positions here: the ``pos`` column is the row
    number). Reading that mapping replaces ``num_clients`` dataset selections; it is used only when
    it has one entry per client and agrees with the partition just loaded, otherwise (another
    flwr-datasets) every partition is loaded as before.
    """
    first = sorted(partitioner.load_partition(0)["pos"])
    drawn = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(drawn, dict) and len(drawn) == num_clients and sorted(drawn.get(0, ())) == first:
        return [sorted(int(i) for i in drawn[pid]) for pid in range(num_clients)]
    return [first, *(sorted(partitioner.load_partition(pid)["pos"]) for pid in range(1, num_clients))]


def label_histogram(labels: list[int], indices: list[int]) -> dict[int, int]:
    """Return ``{label: count}`` of one partition (for run logs)."""
    return dict(sorted(Counter(labels[i] for i in indices).items()))
