"""Tiny stand-ins for the runtime, to drive the real round loop, wire codec and client side in milliseconds.

The loop's tests run whole federations in-process (:class:`fedlora.federation.memory.InMemoryTransport`)
with real strategies, the real wire codec, real fault injection and real compression; only the model
is replaced:

* :class:`TinyTrainer` "trains" by adding seeded noise to the start adapter (leaving a factor alone
  when the plan freezes it), so every update is a pure function of (round, client, start);
* :class:`TinyModel` "evaluates" the global model by a deterministic function of the effective
  update (merges plus ``s B A``) and saves the adapter with safetensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fedlora.core import lora_math as lm
from fedlora.core import seeds
from fedlora.core.metrics import ACCURACY
from fedlora.core.types import AdapterSpec, AdapterState, BaseMerge
from fedlora.federation import wire

MODULES = {"enc.q": (8, 6), "enc.v": (5, 7)}  # non-square: m != n
HEAD = {"classifier.weight": (3, 6), "classifier.bias": (3,)}
SCALING = 2.0


class TinyTrainer:
    """Local "training": start + ``step`` x noise seeded by (round, client); the loss falls with the round."""

    def __init__(self, step: float = 0.3, examples: Sequence[int] = (10, 20, 30, 40, 50, 60),
                 held_out: Sequence[int] = (2, 4, 6)) -> None:
        self.step = step
        self.examples = list(examples)
        self.held_out = list(held_out)  # each client's held-out examples (per-client evaluation)
        self.calls: list[tuple[int, int, int]] = []  # (round, client, number of merges it trained on)
        self.evaluations: list[tuple[int, int, int, int]] = []  # (round, client, rank, merges) of each evaluation
        self.saved: dict[Path, tuple[AdapterState, int]] = {}  # path -> (adapter, rank) each save wrote there

    @staticmethod
    def spec(r_max: int) -> AdapterSpec:
        """The tiny adapter: two modules and a classifier head (zeros)."""
        return AdapterSpec(MODULES, r_max, SCALING, {k: torch.zeros(s) for k, s in HEAD.items()})

    def modules(self) -> dict[str, tuple[int, int]]:
        """The adapted modules."""
        return MODULES

    def num_examples(self, client_id: int) -> int:
        """Client ``client_id``'s training-set size."""
        return self.examples[client_id % len(self.examples)]

    def train(self, client_id: int, assignment: wire.Assignment, merges: Sequence[BaseMerge],
              ) -> tuple[AdapterState, float]:
        """Seeded noise on every tensor the plan trains."""
        self.calls.append((assignment.server_round, client_id, len(merges)))
        gen = torch.Generator().manual_seed(seeds.client_training(0, assignment.server_round, client_id))
        state = {}
        for key in sorted(assignment.start):
            value = assignment.start[key]
            frozen = (lm.is_lora_a_key(key) and not assignment.plan.train_lora_a) or (
                lm.is_lora_b_key(key) and not assignment.plan.train_lora_b)
            state[key] = value.clone() if frozen else value + self.step * torch.randn(value.shape, generator=gen)
        return state, 1.0 / assignment.server_round + 0.01 * client_id

    def evaluate(self, client_id: int, assignment: wire.Assignment, merges: Sequence[BaseMerge],
                 ) -> tuple[dict[str, float], int]:
        """:func:`client_metrics` of the start on base + merges, and the client's held-out count."""
        self.evaluations.append((assignment.server_round, client_id, assignment.plan.rank, len(merges)))
        return client_metrics(client_id, assignment.start, merges), self.held_out[client_id % len(self.held_out)]

    def save(self, path: Path, adapter: AdapterState, rank: int, merges: Sequence[BaseMerge]) -> None:
        """Write ``adapter`` with safetensors under ``path`` (merges folded in) and remember what was saved."""
        folded, folded_rank = lm.fold_merges(adapter, SCALING, merges)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in folded.items()}, str(path / "adapter.safetensors"))
        self.saved[path] = ({k: v.clone() for k, v in folded.items()}, folded_rank)


def energy(adapter: AdapterState, merges: Sequence[BaseMerge]) -> float:
    """The squared norm of the model's effective update (merges plus ``s B A``) and of its head."""
    pairs, head = lm.split_state(adapter)
    total = sum(float(v.double().square().sum()) for v in head.values())
    for module, (a, b) in pairs.items():
        dense = SCALING * (b.double() @ a.double())
        for merge in merges:
            dense = dense + lm.merge_delta(merge, module).double()
        total += float(dense.square().sum())
    return total


def client_metrics(client_id: int, adapter: AdapterState, merges: Sequence[BaseMerge]) -> dict[str, float]:
    """Client ``client_id``'s tiny "evaluation": like :class:`TinyModel`'s, shifted by the client (so clients
    differ, and the worst one is known)."""
    loss = 1.0 / (1.0 + energy(adapter, merges)) + 0.05 * (client_id % 3)
    return {"test_accuracy": 1.0 - loss, "test_loss": loss}


class TinyModel:
    """The loop's server model on tiny shapes: metrics are a pure function of the global model."""

    metric = ACCURACY
    label_names = ("a", "b", "c")

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.evaluated: list[int] = []

    def spec(self, r_max: int) -> AdapterSpec:
        """The tiny adapter."""
        return TinyTrainer.spec(r_max)

    def scaling(self, rank: int) -> float:  # noqa: ARG002
        """``s`` is the same at every rank."""
        return SCALING

    def alpha(self, rank: int) -> float:
        """``alpha = s r``."""
        return SCALING * rank

    def evaluate(self, server_round: int, adapter: AdapterState, rank: int,  # noqa: ARG002
                 merges: Sequence[BaseMerge]) -> dict[str, float]:
        """A loss that measures the global model's effective update; accuracy decreasing in it."""
        self.evaluated.append(server_round)
        loss = 1.0 / (1.0 + energy(adapter, merges))
        return {"test_accuracy": 1.0 - loss, "test_loss": loss}

    def save(self, adapter: AdapterState, rank: int, alpha: float) -> dict[str, Any]:  # noqa: ARG002
        """The adapter as safetensors."""
        path = self.run_dir / "adapter"
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(path / "adapter_model.safetensors"))
        return {"adapter_dir": str(path)}

    def notes(self) -> list[str]:
        """Nothing to say."""
        return []
