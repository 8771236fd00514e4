"""Which clients train in a round, and how a federation's ranks read in one line (standard library only)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from fedlora.core import seeds


def sample_size(num_clients: int, fraction: float, min_clients: int = 1) -> int:
    """How many clients a round samples: ``max(min_clients, round(fraction * N))``, at most ``N``."""
    return min(num_clients, max(min_clients, int(round(fraction * num_clients))))


def sample_clients(client_ids: Sequence[int], fraction: float, server_round: int, seed: int,
                   min_clients: int = 1) -> list[int]:
    """The clients of round ``server_round``, sorted; seeded by (seed, round), so reruns pick the same."""
    k = sample_size(len(client_ids), fraction, min_clients)
    return sorted(seeds.sampling(seed, server_round).sample(sorted(client_ids), k))


def describe_ranks(ranks: Mapping[int, int], limit: int = 16) -> str:
    """The clients' ranks for the run's first line: each client's rank for a small federation, the
    number of clients at each rank for a large one (a thousand client ids say nothing at a glance)."""
    if len(ranks) <= limit:
        return f"ranks {dict(sorted(ranks.items()))}"
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    return "ranks " + ", ".join(f"{rank} x{n}" for rank, n in sorted(counts.items()))


def describe_rank_change(old: Mapping[int, int], new: Mapping[int, int], limit: int = 5) -> str:
    """What differs between two clients-to-ranks maps, naming at most ``limit`` clients."""
    ids = sorted(set(old) | set(new))
    diff = [f"client {i}: {old.get(i, 'absent')} -> {new.get(i, 'absent')}" for i in ids
            if old.get(i) != new.get(i)]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(diff[:limit]) + more
