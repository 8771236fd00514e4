"""Flower's Grid as the loop's transport, in simulation (Ray) and in a deployment (SuperLink).

We drive the Grid directly instead of Flower's ``Strategy.start`` because every client gets its own
message (its rank's slice of the global adapter, the base merges it has not applied yet, possibly
no ``A`` at all), because client sampling must be seeded for reproducible runs, and because bytes
are measured per client and per direction from the serialized messages.

The hello is a ``query`` message to every node: each answers with its partition id (the client
id), its LoRA rank and its number of training examples, and receives the run's label names (a
deployed node that trains on its own file numbers its classes by them).

In simulation the engine itself knows which node holds which partition (a :class:`NodeDirectory`
filled by :mod:`fedlora.flower.simulation`), and every client's rank and data follow from the
run's settings, so the server does not greet every node: Flower's in-process engine looks up each
node's waiting messages by walking every stored message, so a hello to 10,000 nodes costs minutes
(bench/README.md, item 6). It greets only as many as a round samples (which also has that many
actors load the model before round 1) and checks that their answers equal what it computed.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import cast

from flwr.app import Message
from flwr.serverapp import Grid

from fedlora.core.errors import RunError
from fedlora.core.secure import SecureSettings
from fedlora.federation import wire
from fedlora.federation.sampling import describe_ranks
from fedlora.federation.transport import ClientInfo, Delivery, Exchange, SecureExchange
from fedlora.flower.records import content_bytes, to_content, to_packet
from fedlora.flower.secagg import FITRES_METRICS, SecAggError, SecAggSettings, secure_sum
from fedlora.serving.progress import RoundProgress


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


POLL_SECONDS = 0.1  # how often replies are pulled (Flower's own send_and_receive polls as often)


class NodeDirectory:
    """Which Flower node holds which partition (client id), once the simulation engine has registered them."""

    def __init__(self) -> None:
        self._partition_of: dict[int, int] = {}
        self._ready = threading.Event()

    def publish(self, partition_of_node: Mapping[int, int]) -> None:
        """The engine registered its nodes: ``{node id: partition id}``."""
        self._partition_of = dict(partition_of_node)
        self._ready.set()

    def wait(self, timeout: float, stop: threading.Event) -> dict[int, int] | None:
        """``{node id: partition id}``; ``None`` if it did not come within ``timeout`` or the run stopped."""
        deadline = time.monotonic() + timeout
        while not self._ready.wait(POLL_SECONDS):
            if stop.is_set() or time.monotonic() > deadline:
                return None
        return dict(self._partition_of)


class GridTransport:
    """The loop's :class:`~fedlora.federation.transport.Transport` over a Flower ``Grid``.

    Replies are pulled in a loop (as Flower's ``send_and_receive`` does) that also watches the
    run's stop event, so that Ctrl-C or a failed engine ends a wait at once instead of after
    ``round_timeout`` or ``connect_timeout``, and that shows the wait's progress on the console
    (:class:`~fedlora.serving.progress.RoundProgress`: how many clients reported, time so far).
    """

    def __init__(self, grid: Grid, stop: threading.Event | None = None,
                 progress: RoundProgress | None = None, directory: NodeDirectory | None = None,
                 expected_info: Callable[[int], ClientInfo] | None = None, greet: int = 0,
                 num_rounds: int | None = None) -> None:
        """``directory`` and ``expected_info`` (simulation): who is where and what each client will say;
        the hello then goes to ``greet`` nodes only, whose answers must equal ``expected_info``.
        ``num_rounds`` (the run's) makes the progress say ``round 3/10``, as the round's line does.
        """
        self.num_rounds = num_rounds
        self.grid = grid
        self.stop = stop or threading.Event()
        self.progress = progress or RoundProgress()
        self.directory = directory
        self.expected_info = expected_info
        self.greet = greet
        self.node_of: dict[int, int] = {}  # client id -> Flower node id

    def send_and_receive(self, messages: list[Message], timeout: float, label: str = "") -> list[Message]:
        """Push ``messages``, pull replies until all arrived, ``timeout`` passed or the run is stopped."""
        pending = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + timeout
        replies: list[Message] = []
        self.progress.begin(label, len(messages))
        try:
            while pending and time.monotonic() < deadline and not self.stop.is_set():
                got: Iterable[Message] = self.grid.pull_messages(pending)
                for reply in got:
                    replies.append(reply)
                    pending.discard(reply.metadata.reply_to_message_id)
                self.progress.update(len(messages) - len(pending))
                if pending:
                    time.sleep(POLL_SECONDS)
        finally:
            self.progress.end()
        return replies

    def connect(self, expected: int, label_names: Sequence[str], timeout: float) -> dict[int, ClientInfo]:
        """Wait for ``expected`` nodes, greet each (simulation: see the module docstring), return
        ``{client_id: ClientInfo}``.

        A node that fails the hello (in a deployment: a bad ``--node-config`` or data file on that
        node) stops the run here, before any round, with every node's reason. When the run is
        stopped meanwhile, nobody is returned.
        """
        node_ids = self._wait_for_nodes(expected, timeout)
        if self.stop.is_set():
            return {}  # the loop raises RunInterrupted
        if self.directory is not None and self.expected_info is not None:
            return self._connect_known(node_ids, label_names, timeout)
        return self._hello(node_ids, label_names, timeout)

    def _connect_known(self, node_ids: list[int], label_names: Sequence[str],
                       timeout: float) -> dict[int, ClientInfo]:
        """Simulation: the engine's directory names every node's client; greet ``greet`` of them and check."""
        assert self.directory is not None and self.expected_info is not None
        partition_of = self.directory.wait(timeout, self.stop)
        if partition_of is None:
            return {} if self.stop.is_set() else self._hello(node_ids, label_names, timeout)
        greeted = self._hello(node_ids[:self.greet], label_names, timeout) if self.greet else {}
        if self.stop.is_set():
            return {}
        clients = {partition_of[node]: self.expected_info(partition_of[node]) for node in node_ids}
        wrong = [f"client {cid}: answered {info}, expected {clients.get(cid)}" for cid, info in greeted.items()
                 if clients.get(cid) != info or partition_of[self.node_of[cid]] != cid]
        if wrong:
            raise RunError("the simulated clients differ from what the server computed for them (a bug; "
                           "please report it):\n" + "\n".join(wrong))
        self.node_of = {partition_of[node]: node for node in node_ids}
        return clients

    def _hello(self, node_ids: list[int], label_names: Sequence[str], timeout: float) -> dict[int, ClientInfo]:
        hello = [Message(to_content(wire.encode_hello(label_names)), node_id, "query", group_id="hello")
                 for node_id in node_ids]
        replies = self.send_and_receive(hello, timeout, label="hello")
        if self.stop.is_set():
            return {}
        # the SuperLink answers for a node it lost: name that node through the message it answers
        node_of_message = {m.metadata.message_id: m.metadata.dst_node_id for m in hello}
        answered = {node_of_message.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies}
        failed = [f"node {node}: no answer within connect_timeout={timeout:g} s (a client loads the model and "
                  "its data on its first message; on a slow or busy machine raise connect_timeout)"
                  for node in node_ids if node not in answered]
        clients: dict[int, ClientInfo] = {}
        for reply in replies:
            if reply.has_error():
                node = node_of_message.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
                failed.append(f"node {node}: {clean_reason(str(reply.error.reason))}")
                continue
            cid, rank, examples = wire.decode_hello_reply(to_packet(reply.content))
            if cid in clients:
                raise RunError(f"two nodes claim partition-id {cid}; give each node its own")
            clients[cid] = ClientInfo(cid, rank, examples)
            self.node_of[cid] = reply.metadata.src_node_id
        if failed:
            raise RunError(f"{len(failed)} node(s) failed the hello; fix them and start the run again:\n"
                               + "\n".join(failed))
        return clients

    def _wait_for_nodes(self, expected: int, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        node_ids = sorted(self.grid.get_node_ids())
        if len(node_ids) < expected:  # a deployment's nodes connect one by one; a simulation's are there
            self.progress.begin("waiting for nodes", expected, what="nodes connected")
        try:
            while len(node_ids) < expected and time.monotonic() < deadline and not self.stop.is_set():
                self.progress.update(len(node_ids))
                time.sleep(1.0)
                node_ids = sorted(self.grid.get_node_ids())
        finally:
            self.progress.end()
        if not node_ids and not self.stop.is_set():
            raise RunError(f"no client connected within connect_timeout={timeout:g} s; start the SuperNodes "
                           "(docs/deployment.md) or raise connect_timeout")
        return node_ids

    def round_label(self, server_round: int) -> str:
        """How the progress names a round: ``round 3/10`` (``round 3`` if the run's length is unknown)."""
        return f"round {server_round}/{self.num_rounds}" if self.num_rounds else f"round {server_round}"

    def exchange(self, server_round: int, packets: Mapping[int, wire.Packet], timeout: float) -> Exchange:
        """One ``train`` message per client; the replies that arrive within ``timeout``, by client.

        In a deployment the SuperLink itself answers for a node whose heartbeats stopped (an error
        reply from the SuperLink, ``reply_to`` our message): that reply names the client only
        through the message it answers.
        """
        return self._exchange("train", server_round, packets, timeout)

    def evaluate_exchange(self, server_round: int, packets: Mapping[int, wire.Packet], timeout: float) -> Exchange:
        """One ``evaluate`` message per client (the ClientApp's evaluate handler); the replies, by client."""
        return self._exchange("evaluate", server_round, packets, timeout)

    def _exchange(self, kind: str, server_round: int, packets: Mapping[int, wire.Packet], timeout: float,
                  ) -> Exchange:
        contents = {cid: to_content(packet) for cid, packet in packets.items()}
        sizes = {cid: content_bytes(content) for cid, content in contents.items()}
        messages = {cid: Message(content, self.node_of[cid], kind, group_id=str(server_round))
                    for cid, content in contents.items()}
        label = self.round_label(server_round) + (": clients evaluate" if kind == "evaluate" else "")
        replies = self.send_and_receive(list(messages.values()), timeout, label=label)
        client_of_node = {node: cid for cid, node in self.node_of.items()}
        client_of_message = {m.metadata.message_id: cid for cid, m in messages.items()}
        delivered: dict[int, Delivery] = {}
        for reply in replies:
            cid = client_of_node.get(reply.metadata.src_node_id)
            if cid is None:
                cid = client_of_message.get(reply.metadata.reply_to_message_id)
            if cid is None or cid not in packets:
                continue
            if reply.has_error():
                delivered[cid] = Delivery(error=clean_reason(str(reply.error.reason)))
            else:
                delivered[cid] = Delivery(packet=to_packet(reply.content), bytes_up=content_bytes(reply.content))
        return Exchange(sizes, delivered)

    def secure_exchange(self, server_round: int, packets: Mapping[int, wire.Packet], timeout: float,
                        secure: SecureSettings, weight: int, seed: int) -> SecureExchange:
        """One round of SecAgg+ (:func:`fedlora.flower.secagg.secure_sum`) over the clients of ``packets``."""
        client_of = {self.node_of[cid]: cid for cid in packets}
        down, up = dict.fromkeys(packets, 0), dict.fromkeys(packets, 0)
        stage = [0]

        def send(messages: Iterable[Message], wait: float) -> list[Message]:
            batch = list(messages)
            for m in batch:
                down[client_of[m.metadata.dst_node_id]] += content_bytes(m.content)
            stage[0] += 1
            label = f"{self.round_label(server_round)}, secure stage {stage[0]}/4"
            replies = self.send_and_receive(batch, wait, label=label)
            for r in replies:
                if not r.has_error() and r.metadata.src_node_id in client_of:
                    up[client_of[r.metadata.src_node_id]] += content_bytes(r.content)
            return replies

        settings = SecAggSettings(**dataclasses.asdict(secure), max_weight=weight, timeout=timeout)
        training = {self.node_of[cid]: to_content(packet) for cid, packet in packets.items()}
        try:
            result = secure_sum(send, sorted(training), training, settings, group_id=str(server_round),
                                rng=random.Random(seed))
        except SecAggError as exc:
            return SecureExchange(down, up, {}, {}, failure=str(exc))
        reports = {client_of[node]: wire.Packet(metrics=cast(dict[str, int | float],
                                                             dict(reply.content.config_records[FITRES_METRICS])))
                   for node, reply in result.replies.items()}
        dropped = {client_of[node]: (f"dropped out of secure aggregation at its {stage_name} stage"
                                     + (f": {clean_reason(result.errors[node])}" if node in result.errors else
                                        f" (no reply within round_timeout={timeout:g} s)"))
                   for node, stage_name in result.dropped.items() if node in client_of}
        return SecureExchange(down, up, reports, dropped, result.weighted_sum, result.total_weight)

    def describe(self, clients: Mapping[int, ClientInfo]) -> str:
        """How many clients connected and their ranks."""
        ranks = describe_ranks({c: i.rank for c, i in clients.items()})
        return f"{len(clients)} client{'s' if len(clients) != 1 else ''} connected, {ranks}"
