"""How the round loop reaches its clients: the :class:`Transport` protocol and what it carries.

The loop encodes each sampled client's round with the wire codec (:mod:`fedlora.federation.wire`),
hands the packets to a transport and gets back, per client, its reply packet or why there is
none. A transport moves packets and measures them; it decides nothing about training. Three
implement it:

* :class:`fedlora.flower.grid.GridTransport`: Flower's Grid, in simulation (Ray) and deployment;
* :class:`fedlora.federation.memory.InMemoryTransport`: clients as objects in this process (the
  loop's unit tests, no Ray);
* :class:`fedlora.serving.runtime.PooledTransport`: the centralized bound, one learner on the
  pooled data of every client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedlora.core.secure import SecureSettings
from fedlora.federation.wire import Packet


@dataclass(frozen=True)
class ClientInfo:
    """A connected client: its id (the partition it holds), its LoRA rank and its training-set size."""

    client_id: int
    rank: int
    num_examples: int


@dataclass(frozen=True)
class Delivery:
    """One client's answer to a round: its reply, or the error it failed with (``packet`` is then ``None``)."""

    packet: Packet | None = None
    error: str | None = None
    bytes_up: int = 0  # the reply's size as this transport carries it


@dataclass(frozen=True)
class Exchange:
    """A round's traffic: bytes sent to each client, and the answers that came back in time.

    A sampled client missing from ``replies`` did not answer within the timeout.
    """

    bytes_down: Mapping[int, int]
    replies: Mapping[int, Delivery]


@dataclass(frozen=True)
class SecureExchange:
    """A secure round's traffic: what the server learns under secure aggregation, and no more.

    ``weighted_sum`` is ``sum_k n_k x_k`` (float64) and ``total_weight`` ``sum_k n_k`` over the
    clients in ``reports`` (each one's report, sent in the clear; their vectors went only into the
    sum); ``None`` when the sum could not be recovered (``failure`` says why). ``dropped`` names
    every other sampled client with the stage and reason it left at. Bytes are every message of
    every stage, per client.
    """

    bytes_down: Mapping[int, int]
    bytes_up: Mapping[int, int]
    reports: Mapping[int, Packet]
    dropped: Mapping[int, str]
    weighted_sum: np.ndarray | None = None
    total_weight: float = 0.0
    failure: str | None = None


class Transport(Protocol):
    """Carries the loop's packets to clients and their replies back."""

    def connect(self, expected: int, label_names: Sequence[str], timeout: float) -> dict[int, ClientInfo]:
        """Wait for ``expected`` clients (at most ``timeout`` seconds), greet them, return who they are.

        Raises ``RuntimeError`` naming every client that failed the greeting.
        """
        ...

    def exchange(self, server_round: int, packets: Mapping[int, Packet], timeout: float) -> Exchange:
        """Send each client its packet and collect the replies that arrive within ``timeout`` seconds.

        A transport built with the run's stop event returns early once it is set (the loop then
        discards the round).
        """
        ...

    def describe(self, clients: Mapping[int, ClientInfo]) -> str:
        """Who takes part, for the run's first console line."""
        ...


class EvaluatingTransport(Transport, Protocol):
    """A transport that can also ask clients to evaluate a model on their own held-out examples."""

    def evaluate_exchange(self, server_round: int, packets: Mapping[int, Packet], timeout: float) -> Exchange:
        """Send each client an evaluation message (an assignment it evaluates instead of training) and collect
        the replies (:func:`fedlora.federation.wire.encode_evaluation`) that arrive within ``timeout`` seconds."""
        ...


class SecureTransport(Transport, Protocol):
    """A transport that can also run a round under secure aggregation (Flower's Grid does)."""

    def secure_exchange(self, server_round: int, packets: Mapping[int, Packet], timeout: float,
                        secure: SecureSettings, weight: int, seed: int) -> SecureExchange:
        """Run SecAgg+ over the clients of ``packets``: each gets its packet in the protocol's training
        stage and answers a vector (``weight`` ``W`` is the example count that weighs 1, ``seed`` places
        the clients on the protocol's ring). ``timeout`` bounds each stage."""
        ...
