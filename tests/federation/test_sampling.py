"""Seeded client sampling, and how a federation's ranks read in the run's first line."""

from __future__ import annotations

from fedlora.federation.sampling import describe_rank_change, describe_ranks, sample_clients, sample_size


def test_sampling_is_seeded_sorted_and_sized() -> None:
    ids = list(range(100))
    a = sample_clients(ids, 0.1, server_round=3, seed=7)
    assert a == sample_clients(ids, 0.1, server_round=3, seed=7)
    assert a != sample_clients(ids, 0.1, server_round=4, seed=7)
    assert len(a) == 10 and a == sorted(a)
    assert len(sample_clients(ids, 0.001, server_round=1, seed=0, min_clients=3)) == 3
    assert sample_clients([4, 2], 1.0, server_round=1, seed=0) == [2, 4]
    assert sample_size(10, 0.25) == 2 and sample_size(10, 0.01, min_clients=4) == 4 and sample_size(3, 1.0, 9) == 3


def test_describe_ranks_lists_small_federations_and_counts_large_ones() -> None:
    assert describe_ranks({1: 4, 0: 2}) == "ranks {0: 2, 1: 4}"
    big = {i: (2, 4, 8, 16)[i % 4] for i in range(1000)}
    assert describe_ranks(big) == "ranks 2 x250, 4 x250, 8 x250, 16 x250"


def test_describe_rank_change_names_the_clients_that_differ() -> None:
    old = {i: 4 for i in range(10)}
    assert describe_rank_change(old, {**old, 3: 8}) == "client 3: 4 -> 8"
    assert describe_rank_change({0: 2}, {1: 2}) == "client 0: 2 -> absent; client 1: absent -> 2"
    many = describe_rank_change(old, {i: 16 for i in range(10)}, limit=2)
    assert many == "client 0: 4 -> 16; client 1: 4 -> 16 and 8 more"
