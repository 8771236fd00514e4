"""SecAgg+ (``fedlora.flower.secagg``): the server's stages against Flower's own client mod, in-process.

Each node is a real Flower ``ClientApp`` with ``secaggplus_mod`` and its own ``Context`` (the mod keeps
its keys and shares there between stages); a stand-in for ``Grid.send_and_receive`` delivers every
message to its node and can make a node drop at any stage (no reply, as a timeout would give). The
server recovers ``sum_k n_k x_k`` and ``sum_k n_k`` of exactly the nodes that sent a masked vector,
within the quantization step, and never sees a vector in the clear.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp

from fedlora.flower.secagg import (
    FITRES_PARAMETERS,
    SecAggError,
    SecAggSettings,
    secure_sum,
    vector_reply,
)

DIM = 257


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a running ServerApp has: the run and task identity Flower stamps on every message."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def vector_of(node: int) -> np.ndarray:
    return np.random.default_rng(node).normal(0.0, 0.05, DIM)


def examples_of(node: int) -> int:
    return 20 + 7 * node


class Federation:
    """Nodes 11..(10+n), each a ClientApp with Flower's SecAgg+ mod; ``drop`` = {node: stage it vanishes at}."""

    def __init__(self, n: int, drop: dict[int, str] | None = None) -> None:
        self.nodes = list(range(11, 11 + n))
        self.drop = drop or {}
        self.contexts = {i: Context(run_id=1, node_id=i, node_config={}, state=RecordDict(), run_config={})
                         for i in self.nodes}
        self.seen: list[RecordDict] = []  # every reply the server received
        app = ClientApp(mods=[secaggplus_mod])

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            node = context.node_id
            assert msg.content["task"]["node"] == node  # the training payload reached the app
            return Message(vector_reply(vector_of(node), examples_of(node), {"loss": 0.5}), reply_to=msg)

        self.app = app

    def send_and_receive(self, messages, timeout):  # noqa: ANN001, ANN201 - Grid's signature
        replies = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            stage = msg.content.config_records["secaggplus_configs"]["stage"]
            if self.drop.get(node) == stage:
                continue
            reply = self.app(msg, self.contexts[node])
            self.seen.append(reply.content)
            replies.append(reply)
        return replies

    def training(self) -> dict[int, RecordDict]:
        from flwr.app import ConfigRecord

        return {n: RecordDict({"task": ConfigRecord({"node": n})}) for n in self.nodes}


def run(fed: Federation, settings: SecAggSettings | None = None, seed: int = 0):  # noqa: ANN201
    return secure_sum(fed.send_and_receive, fed.nodes, fed.training(), settings or SecAggSettings(max_weight=64),
                      group_id="1", rng=random.Random(seed))


def expected(nodes: list[int]) -> tuple[np.ndarray, int]:
    return sum(examples_of(n) * vector_of(n) for n in nodes), sum(examples_of(n) for n in nodes)


def test_the_server_recovers_the_weighted_sum_and_the_weight_and_sees_no_vector() -> None:
    fed = Federation(6)
    result = run(fed)
    want, weight = expected(fed.nodes)
    assert result.contributors == fed.nodes and result.dropped == {}
    step = 2 * 8.0 / 2**22 * 64  # quantization step of one client's weighted entry, in units of n_k x_k
    np.testing.assert_allclose(result.weighted_sum, want, atol=len(fed.nodes) * step)
    assert round(result.total_weight) == weight
    # what the server received: no reply carries a vector in the clear (the mod clears the app's arrays)
    for content in fed.seen:
        record = content.array_records.get(FITRES_PARAMETERS)
        assert record is None or len(record) == 0


@pytest.mark.parametrize("drop", [
    {13: "collect_masked_vectors"},  # drops while training: its pairwise masks are rebuilt from its shares
    {13: "collect_masked_vectors", 14: "collect_masked_vectors"},  # two neighbours on the ring, maybe
    {12: "setup"},  # never shared anything: simply not in the round
    {16: "share_keys"},
    {11: "unmask"},  # its vector is in the sum; the others' shares still unmask it
])
def test_a_node_that_drops_at_any_stage_leaves_the_sum_of_those_that_sent_a_vector(drop: dict[int, str]) -> None:
    fed = Federation(7, drop)
    result = run(fed, SecAggSettings(num_shares=5, threshold=3, max_weight=64))
    in_sum = [n for n in fed.nodes if drop.get(n) not in ("setup", "share_keys", "collect_masked_vectors")]
    assert result.contributors == in_sum and result.dropped == drop
    want, weight = expected(in_sum)
    np.testing.assert_allclose(result.weighted_sum, want, atol=len(in_sum) * 2 * 8.0 / 2**22 * 64)
    assert round(result.total_weight) == weight


def test_too_few_nodes_left_fail_the_round_naming_the_stage() -> None:
    fed = Federation(4, {11: "collect_masked_vectors", 12: "collect_masked_vectors"})
    with pytest.raises(SecAggError, match="stage collect_masked_vectors: 2 node"):
        run(fed, SecAggSettings(num_shares=3, threshold=3, max_weight=64))


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="threshold=1"):
        SecAggSettings(threshold=1)
