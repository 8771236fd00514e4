"""Clients as objects in this process: a :class:`~fedlora.federation.transport.Transport` without a network.

Every training message is handled by the real client side of a round
(:func:`fedlora.federation.client.train_round`: the wire codec both ways, base merges, faults,
compression with error feedback), one client after the other, with no serialisation, no Ray and no
Flower. The loop's unit tests drive whole federations through it with real strategies and a tiny
trainer, in milliseconds; the centralized bound uses it for its one pooled learner.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from fedlora.federation.client import ClientSide, MemoryStore, evaluate_round, train_round
from fedlora.federation.sampling import describe_ranks
from fedlora.federation.transport import ClientInfo, Delivery, Exchange
from fedlora.federation.wire import Packet


class InMemoryTransport:
    """Clients ``ranks`` (client id -> LoRA rank), each with its own :class:`MemoryStore`.

    Parameters
    ----------
    ranks:
        The clients and their ranks.
    side:
        What every client trains with (trainer, compressor, faults).
    measure:
        Report each packet's array bytes as its size (``False``: 0, nothing is communicated).
    silent:
        ``(round, client) -> True`` for a client that does not answer that round (a lost reply).
    stop:
        The run's stop event: once set, no further client of the round is run.
    saves_to:
        Where a personalized strategy's clients save their own models after the last round
        (``<saves_to>/<client>``); ``None``: they save none (nothing of them is on disk).
    """

    def __init__(self, ranks: Mapping[int, int], side: ClientSide, *, measure: bool = True,
                 silent: Callable[[int, int], bool] | None = None, stop: threading.Event | None = None,
                 saves_to: Path | None = None) -> None:
        self.ranks = dict(ranks)
        self.side = side
        self.measure = measure
        self.silent = silent or (lambda server_round, client_id: False)
        self.stores = {cid: MemoryStore(saves_to=None if saves_to is None else saves_to / str(cid))
                       for cid in self.ranks}
        self.stop = stop or threading.Event()

    def connect(self, expected: int, label_names: Sequence[str], timeout: float) -> dict[int, ClientInfo]:  # noqa: ARG002
        """Every client is there at once."""
        return {cid: ClientInfo(cid, rank, self.side.trainer.num_examples(cid)) for cid, rank in self.ranks.items()}

    def exchange(self, server_round: int, packets: Mapping[int, Packet], timeout: float) -> Exchange:  # noqa: ARG002
        """Run each client's round in turn; an exception is that client's error reply."""
        return self._run(packets, train_round, lambda cid: self.silent(server_round, cid))

    def evaluate_exchange(self, server_round: int, packets: Mapping[int, Packet],  # noqa: ARG002
                          timeout: float) -> Exchange:  # noqa: ARG002
        """Have each client evaluate the model of its packet on its held-out examples, in turn."""
        return self._run(packets, evaluate_round, lambda cid: False)

    def _run(self, packets: Mapping[int, Packet], handle: Callable[[Packet, int, ClientSide, MemoryStore], Packet],
             silent: Callable[[int], bool]) -> Exchange:
        replies: dict[int, Delivery] = {}
        for cid in sorted(packets):
            if self.stop.is_set():
                break
            if silent(cid):
                continue
            try:
                reply = handle(packets[cid], cid, self.side, self.stores[cid])
            except Exception as exc:  # noqa: BLE001 - a client's failure is its reply, as in Flower
                replies[cid] = Delivery(error=str(exc))
                continue
            replies[cid] = Delivery(packet=reply, bytes_up=self.size(reply))
        return Exchange({cid: self.size(p) for cid, p in packets.items()}, replies)

    def size(self, packet: Packet) -> int:
        """A packet's size: the bytes of its arrays (0 when not measuring)."""
        return packet.nbytes() if self.measure else 0

    def describe(self, clients: Mapping[int, ClientInfo]) -> str:
        """Who takes part."""
        return f"{len(clients)} in-process clients, {describe_ranks({c: i.rank for c, i in clients.items()})}"
