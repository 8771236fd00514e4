"""Many clients, few sampled: the configuration says when the data are too few, and a round of the loop
touches only the clients it sampled (bench/clients.py measures the whole simulation; bench/README.md, item 6)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import compose
from federation_kit import TinyModel, TinyTrainer

from fedlora.config.validate import validate
from fedlora.core.errors import ConfigError
from fedlora.core.faults import FaultSettings
from fedlora.federation.client import ClientSide
from fedlora.federation.loop import Federation, LoopSettings
from fedlora.federation.memory import InMemoryTransport
from fedlora.federation.transport import Exchange
from fedlora.results.recorder import RunRecorder
from strategies.fedavg import FedAvg

SCALE = ["num_clients=10000", "fraction_train=0.001", "min_clients=10", "partition=iid",
         "partition.min_partition_size=1"]


def test_more_clients_than_training_articles_is_a_configuration_error() -> None:
    """The BBC training split holds 1,781 articles: 10,000 clients are refused before anything starts."""
    with pytest.raises(ConfigError) as err:
        validate(compose(SCALE), check_model=False)
    text = str(err.value)
    assert "num_clients=10000" in text and "1781 examples" in text and "use at most 1781 clients" in text
    assert "experiment=causal_demo data.max_examples=40000" in text  # the way to get data for that many


def test_the_generated_instructions_feed_ten_thousand_clients() -> None:
    validate(compose(["experiment=causal_demo", "data.max_examples=40000", *SCALE]), check_model=False)


class Counting(InMemoryTransport):
    """Records how many packets each round sends."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[int] = []

    def exchange(self, server_round: int, packets: Mapping[int, Any], timeout: float) -> Exchange:
        self.sent.append(len(packets))
        return super().exchange(server_round, packets, timeout)


class CountingFedAvg(FedAvg):
    """FedAvg that counts its per-client plans."""

    plans = 0

    def plan(self, *args: Any, **kwargs: Any) -> Any:
        type(self).plans += 1
        return super().plan(*args, **kwargs)


def test_a_round_plans_and_sends_only_the_sampled_clients(tmp_path: Path) -> None:
    n = 10_000
    side = ClientSide(trainer=TinyTrainer(), compressor=None, faults=FaultSettings(), seed=0)
    transport = Counting({c: [2, 4, 8, 16][c % 4] for c in range(n)}, side)
    settings = LoopSettings(name="scale", seed=0, num_clients=n, num_rounds=3, fraction_train=10 / n, min_clients=10)
    Federation(settings, strategy=CountingFedAvg(), transport=transport, model=TinyModel(tmp_path), run_dir=tmp_path,
               recorder=RunRecorder(tmp_path, tensorboard=False), say=lambda line: None).run()
    assert transport.sent == [10, 10, 10]
    assert CountingFedAvg.plans == 30
