"""Simulation: the engine's node directory replaces a hello to every node; a few are greeted as a check."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

from fedlora.core.errors import RunError
from fedlora.federation import wire
from fedlora.federation.transport import ClientInfo
from fedlora.flower.grid import GridTransport, NodeDirectory
from fedlora.flower.records import to_content


class HelloGrid:
    """Nodes 100, 101, ... hold partitions 0, 1, ...; each answers the hello with ``answer(cid)``."""

    def __init__(self, n: int, answer) -> None:  # noqa: ANN001
        self.nodes = [100 + i for i in range(n)]
        self.answer = answer
        self.greeted: list[int] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages: list) -> list[str]:
        self.pending = list(messages)
        self.greeted += [m.metadata.dst_node_id for m in messages]
        return [f"m-{i}" for i in range(len(messages))]

    def pull_messages(self, ids: set) -> list:
        replies = []
        for i, message in enumerate(self.pending):
            cid = message.metadata.dst_node_id - 100
            content = to_content(wire.encode_hello_reply(*self.answer(cid)))
            replies.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m-{i}",
                                                                    src_node_id=message.metadata.dst_node_id),
                                           content=content, has_error=lambda: False))
        self.pending = []
        return replies


@pytest.fixture(autouse=True)
def server_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a ServerApp process has, so that Flower lets the test build messages: its run, node, task."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def expected(cid: int) -> ClientInfo:
    return ClientInfo(cid, [2, 4, 8][cid % 3], 10 + cid)


def transport(grid: HelloGrid, greet: int) -> GridTransport:
    directory = NodeDirectory()
    directory.publish({node: node - 100 for node in grid.nodes})
    return GridTransport(grid, threading.Event(), directory=directory, expected_info=expected, greet=greet)  # type: ignore[arg-type]


def test_only_a_rounds_worth_of_nodes_is_greeted_and_every_client_is_known() -> None:
    grid = HelloGrid(50, lambda cid: (cid, expected(cid).rank, expected(cid).num_examples))
    t = transport(grid, greet=5)
    clients = t.connect(50, ("a", "b"), timeout=10)
    assert clients == {cid: expected(cid) for cid in range(50)}
    assert len(grid.greeted) == 5
    assert t.node_of == {cid: 100 + cid for cid in range(50)}


def test_a_greeted_client_that_differs_from_the_servers_view_stops_the_run() -> None:
    grid = HelloGrid(6, lambda cid: (cid, expected(cid).rank, expected(cid).num_examples + (cid == 1)))
    with pytest.raises(RunError, match="client 1: answered"):
        transport(grid, greet=6).connect(6, ("a",), timeout=10)


def test_without_the_directory_every_node_is_greeted() -> None:
    grid = HelloGrid(7, lambda cid: (cid, expected(cid).rank, expected(cid).num_examples))
    clients = GridTransport(grid, threading.Event()).connect(7, ("a",), timeout=10)  # type: ignore[arg-type]
    assert clients == {cid: expected(cid) for cid in range(7)} and len(grid.greeted) == 7


def test_a_directory_that_never_comes_falls_back_to_greeting_everyone() -> None:
    grid = HelloGrid(4, lambda cid: (cid, expected(cid).rank, expected(cid).num_examples))
    t = GridTransport(grid, threading.Event(), directory=NodeDirectory(), expected_info=expected, greet=1)  # type: ignore[arg-type]
    assert t.connect(4, ("a",), timeout=0.3) == {cid: expected(cid) for cid in range(4)}
    assert len(grid.greeted) == 4
