"""The clients of a run as the server sees them: who connected (the hello), who trains each round.

The hello is a ``query`` message to every node: each answers with its partition id (the client
id), its LoRA rank and its number of training examples, and receives the run's label names (a
deployed node that trains on its own file numbers its classes by them). Sampling is seeded by
(seed, round) so that two runs with the same seed train the same clients in every round.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlora.federation import keys


@dataclass(frozen=True)
class ClientInfo:
    """A connected client: its node, partition id, rank and training-set size."""

    node_id: int
    client_id: int
    rank: int
    num_examples: int


def describe_ranks(ranks: dict[int, int], limit: int = 16) -> str:
    """The clients' ranks for the run's first line: each client's rank for a small federation, the
    number of clients at each rank for a large one (a thousand client ids say nothing at a glance)."""
    if len(ranks) <= limit:
        return f"ranks {dict(sorted(ranks.items()))}"
    counts: dict[int, int] = {}
    for rank in ranks.values():
        counts[rank] = counts.get(rank, 0) + 1
    return "ranks " + ", ".join(f"{rank} x{n}" for rank, n in sorted(counts.items()))


def describe_rank_change(old: dict[int, int], new: dict[int, int], limit: int = 5) -> str:
    """What differs between two clients-to-ranks maps, naming at most ``limit`` clients."""
    ids = sorted(set(old) | set(new))
    diff = [f"client {i}: {old.get(i, 'absent')} -> {new.get(i, 'absent')}" for i in ids
            if old.get(i) != new.get(i)]
    more = f" and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(diff[:limit]) + more


def clean_reason(reason: str) -> str:
    """Shorten Flower's error reason to the client's own message.

    In simulation Flower wraps a ClientApp exception as ``"<class '...ClientAppException'>:<'\\n
    Exception ClientAppException occurred. Message: <text>'>"``, in a deployment as
    ``"<class '<the exception's class>'>:<'<text>'>"``; we keep ``<text>``.
    """
    marker = "Message: "
    if marker in reason:
        text = reason[reason.rfind(marker) + len(marker):]
    elif reason.startswith("<class '") and "'>:<'" in reason:
        text = reason[reason.index("'>:<'") + len("'>:<'"):]
    else:
        text = reason
    while text.endswith("'>"):
        text = text[:-2]
    return text.strip()[:500]


def discover_clients(grid: Grid, expected: int, timeout: float,
                     label_names: tuple[str, ...] = ()) -> dict[int, ClientInfo]:
    """Wait for ``expected`` nodes, ask each who it is, return ``{client_id: ClientInfo}``.

    The hello carries the run's ``label_names`` (a deployed node with its own file numbers its
    classes by them). A node that fails the hello (in a deployment: a bad ``--node-config`` or
    data file on that node) stops the run here, before any round, with every node's reason.
    """
    deadline = time.monotonic() + timeout
    node_ids = sorted(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(1.0)
        node_ids = sorted(grid.get_node_ids())
    if not node_ids:
        raise RuntimeError(f"no client connected within {timeout:.0f} s")
    conf = ConfigRecord({keys.ACTION: keys.HELLO, keys.LABEL_NAMES: list(label_names)})
    hello = [Message(RecordDict({keys.CONFIG: conf}), node_id, "query", group_id="hello")
             for node_id in node_ids]
    clients: dict[int, ClientInfo] = {}
    failed = []
    replies = grid.send_and_receive(hello, timeout=timeout)
    # the SuperLink answers for a node it lost: name that node through the message it answers
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in hello}
    answered = {node_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies}
    failed += [f"node {node}: no answer within connect_timeout={timeout:g} s (a client loads the model and "
               "its data on its first message; on a slow or busy machine raise connect_timeout)"
               for node in node_ids if node not in answered]
    for reply in replies:
        if reply.has_error():
            node = node_of.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
            failed.append(f"node {node}: {clean_reason(str(reply.error.reason))}")
            continue
        m = reply.content[keys.METRICS]
        info = ClientInfo(reply.metadata.src_node_id, int(m[keys.PARTITION_ID]), int(m[keys.RANK]),
                          int(m[keys.NUM_EXAMPLES]))
        if info.client_id in clients:
            raise RuntimeError(f"two nodes claim partition-id {info.client_id}; give each node its own")
        clients[info.client_id] = info
    if failed:
        raise RuntimeError(f"{len(failed)} node(s) failed the hello; fix them and start the run again:\n"
                           + "\n".join(failed))
    return clients


def sample_clients(client_ids: list[int], fraction: float, server_round: int, seed: int,
                   min_clients: int = 1) -> list[int]:
    """Sample ``max(min_clients, round(fraction * N))`` clients, seeded by (seed, round)."""
    k = min(len(client_ids), max(min_clients, int(round(fraction * len(client_ids)))))
    rng = random.Random(seed * 7919 + server_round)
    return sorted(rng.sample(sorted(client_ids), k))
